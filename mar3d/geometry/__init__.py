"""Mesh extraction from occupancy fields and analytic reference shapes."""
from mar3d.geometry.extract import (ExtractionResult, extract_mesh, latent_occupancy_fn,
                                    keep_large_components, save_mesh)

__all__ = ["ExtractionResult", "extract_mesh", "latent_occupancy_fn", "keep_large_components",
           "save_mesh"]
