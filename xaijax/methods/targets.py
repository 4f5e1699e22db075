"""Targets other than a logit: a layer's activation, a unit or channel, a detection's box score, a segmentation region.

Work in progress (issue 22): nothing is registered here yet."""
