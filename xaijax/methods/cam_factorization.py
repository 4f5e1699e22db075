"""CAMs from factorised activations: Eigen-CAM, EigenGrad-CAM, Deep Feature Factorization.

Work in progress (issue 22): nothing is registered here yet."""
