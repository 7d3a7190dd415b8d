"""quantdiff: 8-bit build pipeline for diffusion models."""
