"""The data job: mesh files -> Parquet shards (schema v1) + manifest.json + errors.parquet.

``process_mesh(path, cfg)`` is the pure per-mesh function (load, normalize, watertight,
surface pyramid, occupancy, renders); it raises ``MeshError`` for bad input.
``prepare_dataset(input, output, cfg)`` runs it over every input with Ray Data and writes
the shards itself, so that the layout is deterministic and completion is atomic:

- inputs are sorted by path; new rows are grouped into shards of ``cfg.shard_size`` in
  that order and numbered after the shards already present;
- a shard is written to ``shard-XXXXX.parquet.tmp``, fsynced and renamed; it counts as
  complete only once ``manifest.json`` (itself replaced atomically) lists it with its
  sha256, so an interrupted run leaves nothing that looks finished;
- a re-run skips inputs whose uid is in a complete shard and inputs already recorded in
  ``errors.parquet`` with the same content hash (unless ``cfg.retry_errors``);
- every input ends up as a shard row or an errors row: the Ray task catches every
  exception into an error record, and discovery problems (missing files, manifest paths
  escaping the manifest's root, duplicate content, sha256 mismatches) become error rows too.

Inputs (``find_inputs``): a folder of meshes, a manifest listing paths, an Objaverse 1.0
tree or an Objaverse-XL annotations table (:mod:`mar3d.data.sources`, which also selects
objects by ``DataConfig.select_*``); several of them make one dataset. Rows of the
Objaverse layouts keep their labels (``schema.LABEL_COLUMNS``: source uid, category,
name, license, source); error rows keep the source uid. With ``DataConfig.synth_objects``
the job first makes a procedural corpus (:mod:`mar3d.data.synth`) in ``OUTPUT/corpus``
and takes it as one more input.

One job per output directory at a time: leftover ``.tmp`` files and shards that the
manifest does not list are removed at start-up.

Input and output may be ``s3://`` prefixes (:mod:`mar3d.storage`): each Ray task copies
its mesh and the files it references (OBJ materials and textures, glTF buffers and
images; each checked to stay inside the mesh's folder first) into a temporary folder,
because the loaders need real files; rows keep the URI as ``source_path``. On S3 a shard
is one object, visible only once its upload completed, so no ``.tmp`` step is needed.

The job's parts: :mod:`.inputs` (discovery and content hashes), :mod:`.process` (the
per-mesh Ray task), :mod:`.shards` (shards, manifest and errors table on disk) and
:mod:`.job` (``prepare_dataset``: the Ray Data pipeline, resume and skip).
"""
from .inputs import MANIFEST_SUFFIXES, Inputs, discover_inputs, find_inputs, merge_inputs
from .job import CORPUS, PrepareResult, prepare_dataset
from .process import cpu_stage, fetch_mesh, process_mesh, sample_geometry, watertight_surface
from .shards import (ERRORS, MANIFEST, SHARDS, complete_shards, error_record, load_manifest, read_errors,
                     watertight_method, write_shard)

__all__ = ["CORPUS", "ERRORS", "MANIFEST", "MANIFEST_SUFFIXES", "SHARDS", "Inputs", "PrepareResult",
           "complete_shards", "cpu_stage", "discover_inputs", "error_record", "fetch_mesh",
           "find_inputs", "load_manifest", "merge_inputs", "prepare_dataset", "process_mesh",
           "read_errors", "sample_geometry", "watertight_method", "watertight_surface", "write_shard"]
