"""Small Parquet shards of real YCB meshes for the training tests.

Built once per test session with the data job itself (``prepare_dataset``) and a
deliberately small DataConfig: coarse watertight grid, few points, two 64 px views, so
the whole preparation takes seconds on two cores.
"""
from __future__ import annotations

from pathlib import Path


def small_data_config():
    from mar3d.data.config import DataConfig

    return DataConfig(watertight_resolution=64, surface_sizes=(2048, 512, 128),
                      num_vol=4096, num_near=4096, render_views=2, render_resolution=64,
                      shard_size=2, num_workers=2, cpus_per_task=0.5)


def make_small_shards(meshes_dir: Path, output: Path) -> Path:
    from mar3d.data.prepare import prepare_dataset

    result = prepare_dataset(meshes_dir, output, small_data_config(), progress=False)
    if result.total_errors or result.total_rows == 0:
        raise RuntimeError(f"test shards: {result.total_errors} meshes failed, "
                           f"{result.total_rows} rows written: {result}")
    return output
