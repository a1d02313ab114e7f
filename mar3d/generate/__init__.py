"""Batch generation: a dataset of images -> meshes + ``results.parquet``, as a Ray Data job.

    mar3d generate --images DIR|PARQUET --model models:/mar3d@champion --output DIR

Inputs (see :func:`list_inputs`):

- a folder of images (recursive; .png .jpg .jpeg .webp .bmp .gif .tif .tiff). Any other
  file in it becomes an error row ``not_image``: nothing is silently ignored. Item id =
  the path relative to the folder (``sub/cat.png`` -> ``sub__cat.png``);
- one Parquet file, or a folder holding only Parquet files, with a binary ``image``
  column (encoded image bytes, or a Hugging Face ``{bytes, path}`` struct) and an
  optional ``id`` column; default id ``<file stem>-<row>``;
- a mar3d shard dataset (``manifest.json`` + ``shards/``): item ``<uid>_v<view>`` is one
  stored condition view (``view_index``, or every view with ``all_views``); its result row
  keeps the object's ``source_uid`` and ``category`` where the shards have them;
- a single image file.

Ids are made safe as file names (characters outside ``[A-Za-z0-9._-]`` -> ``_``, folders
joined with ``__``); ids with ``..``/``.``/empty path parts or absolute paths are refused
(``unsafe_id``), and a second item with the same id gets a ``duplicate_id`` row.

The job: the driver lists items (cheap: paths and row numbers, no pixels) and hands the
ones still to do to ``ray.data.from_items(...).map_batches(_GeneratorActor, ...)``: an
actor pool of ``num_actors`` actors that each load the model once, read their items'
pixels themselves (image files, Parquet row groups, shard rows) and turn each item into
one result row inside a try/except, so one bad image or one failed extraction is an
error row, never a dead job. Meshes are written by the actors, atomically (temporary
file + rename), as ``OUTPUT/meshes/<id>.<fmt>``. The driver streams result rows into a
progress bar and into ``OUTPUT/results.parquet`` (atomic replace, merged with earlier
runs, checkpointed every few seconds so an interrupted job keeps its progress).

Re-runs: an item is skipped when its input is unchanged (file size and mtime, and row /
view, as recorded in ``fingerprint``) and either its previous row is ``ok`` with all
requested mesh files present, or its previous error is deterministic (``not_image``,
``invalid_image``, ``missing_image``, ``no_surface``..., see ``DETERMINISTIC_REASONS``) and
``retry_errors`` is off. Other errors (``internal_error``, ``write_error``: out of memory,
full disk...) are retried. Rows of items that are no longer in the input are kept. An output folder is bound to one
model and one set of generation settings (``generate.json``); reusing it with others is
refused, so one results table never mixes models. ``models:/NAME@ALIAS`` is pinned to the
alias's current version once, in the driver, so an alias moving during the job cannot
mix two models either.

Seeds: item seed = ``base_seed`` + a stable 32-bit hash of the item id (mod 2^32), so a
re-run, a re-ordering or a different batch split gives every image the same seed.

The output may be an ``s3://`` prefix (:mod:`mar3d.storage`): actors then upload each
mesh as one object (visible only when complete, like the local rename), and
``results.parquet``, ``generate.json``, the contact sheet and the gallery are objects beside them.

``OUTPUT/gallery.html`` (:mod:`mar3d.generate.gallery`) shows every result, paged: its
input image and its mesh as a rotatable 3D view (ground truth beside it for dataset
inputs), errors listed with their reasons; ``mar3d view OUTPUT`` rebuilds it.

One job per output folder at a time. On a cluster, the model folder (for a local-folder
URI), the input and the output must be on storage every node sees; registry URIs are
downloaded by each actor. The pool is capped at the actors the cluster can hold when the
job starts (a warning says so), so it never waits for CPUs or GPUs that do not exist.
"""
from mar3d.generate.config import (CONTACT_SHEET, DETERMINISTIC_REASONS, GALLERY, IMAGE_SUFFIXES,
                                   MESH_FORMATS, MESHES, RESULTS, SETTINGS, GenerateConfig, GenerateResult)
from mar3d.generate.contact_sheet import write_contact_sheet
from mar3d.generate.gallery import write_gallery
from mar3d.generate.inputs import ITEM_FIELDS, ITEM_LABELS, ItemReader, item_seed, list_inputs
from mar3d.generate.job import batch_generate
from mar3d.generate.results import RESULTS_SCHEMA, mesh_paths, read_results

__all__ = [
    "CONTACT_SHEET", "DETERMINISTIC_REASONS", "GALLERY", "IMAGE_SUFFIXES", "ITEM_FIELDS", "ITEM_LABELS",
    "MESHES", "MESH_FORMATS", "RESULTS", "RESULTS_SCHEMA", "SETTINGS",
    "GenerateConfig", "GenerateResult", "ItemReader",
    "batch_generate", "item_seed", "list_inputs", "mesh_paths", "read_results", "write_contact_sheet",
    "write_gallery",
]
