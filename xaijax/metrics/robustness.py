"""Robustness metrics: max/avg sensitivity, local Lipschitz, continuity, consistency, RIS/ROS/RRS.

Work in progress (issue 23): nothing is registered here yet."""
