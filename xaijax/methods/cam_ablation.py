"""CAMs from perturbed activations: Ablation-CAM, Recipro-CAM.

Work in progress (issue 22): nothing is registered here yet."""
