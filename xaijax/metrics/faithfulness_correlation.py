"""Correlation faithfulness metrics (faithfulness correlation and estimate, monotonicity, sensitivity-n, infidelity).

Work in progress (issue 23): nothing is registered here yet."""
