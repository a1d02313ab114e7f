"""Small Parquet shards of real YCB meshes for the training tests.

Built once per test session with the data job itself (``prepare_dataset``) and the
pipeline's smoke data preset (``data_smoke``: coarse watertight grid, few points, two
small views), so the whole preparation takes seconds on two cores.
"""
from __future__ import annotations

from pathlib import Path


def small_data_config():
    from mar3d.config import load_config
    from mar3d.data.config import DataConfig

    # Shards of 2 rows, so every test reads a dataset of several shards; half a CPU per
    # task, so the data tasks fit beside the session's other Ray work on 2 cores.
    return load_config(DataConfig, "data_smoke", ["shard_size=2", "cpus_per_task=0.5"])


def make_small_shards(meshes_dir: Path, output: Path) -> Path:
    from mar3d.data.prepare import prepare_dataset

    result = prepare_dataset(meshes_dir, output, small_data_config(), progress=False)
    if result.total_errors or result.total_rows == 0:
        raise RuntimeError(f"test shards: {result.total_errors} meshes failed, "
                           f"{result.total_rows} rows written: {result}")
    return output
