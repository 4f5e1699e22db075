"""Randomisation metrics: model parameter randomisation (MPRT, smooth and efficient MPRT), random logit.

Work in progress (issue 23): nothing is registered here yet."""
