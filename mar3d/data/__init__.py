"""Mesh data pipeline: mesh files -> Parquet shards (schema v1) -> training samples.

``prepare_dataset`` runs the Ray Data job, ``process_mesh`` is its per-mesh function,
``ShapeDataset`` / ``ray_dataset`` read the shards for the VAE and MAR stages.
"""
from .config import SCHEMA_VERSION, DataConfig
from .dataset import ShapeDataset, ray_dataset
from .errors import REASONS, MeshError
from .prepare import PrepareResult, prepare_dataset, process_mesh

__all__ = ["SCHEMA_VERSION", "DataConfig", "MeshError", "PrepareResult", "REASONS", "ShapeDataset",
           "prepare_dataset", "process_mesh", "ray_dataset"]
