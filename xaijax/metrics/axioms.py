"""Axiom metrics: completeness, non-sensitivity, input invariance.

Work in progress (issue 23): nothing is registered here yet."""
