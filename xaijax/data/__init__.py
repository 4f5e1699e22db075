"""Datasets and bundled data files (ImageNet class names)."""
