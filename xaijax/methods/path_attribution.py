"""Path and reference attribution methods: GradientSHAP / Expected Gradients, Guided IG, Blur IG.

Work in progress (issue 22): nothing is registered here yet."""
