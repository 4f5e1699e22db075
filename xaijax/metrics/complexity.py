"""Complexity metrics: sparseness (Gini), complexity (entropy), effective complexity.

Work in progress (issue 23): nothing is registered here yet."""
