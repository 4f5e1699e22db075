"""DeepLIFT (rescale rule) and DeepLIFT-SHAP as propagation rules.

Work in progress (issue 22): nothing is registered here yet."""
