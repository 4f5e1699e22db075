"""Localisation metrics: relevance mass / rank accuracy, top-k intersection, attribution localisation, AUC, focus.

Work in progress (issue 23): nothing is registered here yet."""
