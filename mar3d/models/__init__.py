"""Neural networks of MAR-3D: the shape VAE (``vae``), shared transformer blocks
(``attention``), point embeddings (``embed``), and the cascaded MAR models."""
from mar3d.models.vae import ShapeVAE, VAEConfig

__all__ = ["ShapeVAE", "VAEConfig"]
