"""Perturbation-curve faithfulness metrics (pixel-flipping, region perturbation, selectivity, IROF, ROAD, sufficiency, average drop, increase in confidence).

Work in progress (issue 23): nothing is registered here yet."""
