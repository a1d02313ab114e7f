"""The Ray Data actor that generates: loads the model once, then turns each batch of
items into result rows and writes their meshes (locally or as objects)."""
from __future__ import annotations

import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any

import pyarrow as pa

from mar3d import storage
from mar3d.config import from_dict
from mar3d.generate.inputs import ItemReader
from mar3d.generate.results import RESULTS_SCHEMA, _result_row, mesh_paths
from mar3d.geometry.extract import no_surface_reason
from mar3d.inference import PipelineConfig


def _write_mesh_atomic(mesh, path: Path) -> None:
    from mar3d.geometry.extract import save_mesh

    with storage.atomic_local_path(path) as tmp:  # same suffix: same format
        save_mesh(mesh, tmp)


def _upload_mesh(mesh, location: str) -> None:
    """Export to a local file first (the exporters pick the format from the suffix), then
    upload it as one object."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mar3d-out-") as tmp:
        local = Path(tmp) / storage.name(location)
        _write_mesh_atomic(mesh, local)
        storage.write_bytes(location, local.read_bytes())


class _GeneratorActor:
    """Ray Data callable class: loads the model once, then item batch -> result batch."""

    def __init__(self, model_uri: str, pipeline: dict, output: str, formats: list[str],
                 tracking_uri: str | None, use_gpu: bool, num_cpus: float):
        import torch

        from mar3d.inference import MAR3DPipeline

        if not use_gpu:
            # Match torch's intra-op threads to the actor's CPU share, so that N actors on
            # N cores do not oversubscribe them.
            torch.set_num_threads(max(1, int(num_cpus)))
        self.output = output if storage.is_remote(output) else Path(output)
        self.formats = list(formats)
        self.model_uri = model_uri
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.pipe = MAR3DPipeline.from_pretrained(model_uri, config=from_dict(PipelineConfig, pipeline),
                                                  device="cuda" if use_gpu else "cpu",
                                                  tracking_uri=tracking_uri)
        # Pixels are read by reference, in the actor (the driver never holds them).
        self.reader = ItemReader()

    def _error(self, item: dict, reason: str, error: str, timings: dict, **extra) -> dict:
        return _result_row(item, "error", reason=reason, error=error, model=self.model_uri, worker=self.worker,
                           **timings, **extra, seconds=sum(timings.values()))

    def _internal_error(self, item: dict, e: Exception, timings: dict) -> dict:
        tb = traceback.format_exc(limit=4)
        if self.pipe.device.type == "cuda" and "out of memory" in str(e):
            import torch

            torch.cuda.empty_cache()  # let the next item start from a clean allocator
        return self._error(item, "internal_error", f"{type(e).__name__}: {e}\n{tb}"[:4000], timings)

    def _load(self, item: dict) -> tuple[Any, dict, dict | None]:
        """(RGBA pixels or None, timings, error row or None) of one item."""
        from mar3d.inference import InvalidImageError, load_image

        t0 = time.perf_counter()
        timings = {"load_seconds": 0.0, "sample_seconds": 0.0, "decode_seconds": 0.0, "write_seconds": 0.0}
        try:
            rgba = load_image(self.reader.image(item), self.pipe.config)
        except (InvalidImageError, FileNotFoundError) as e:
            reason = "invalid_image" if isinstance(e, InvalidImageError) else "missing_image"
            timings["load_seconds"] = time.perf_counter() - t0
            return None, timings, self._error(item, reason, str(e), timings)
        except Exception as e:  # noqa: BLE001 - one item must never kill the job
            return None, timings, self._internal_error(item, e, timings)
        timings["load_seconds"] = time.perf_counter() - t0
        return rgba, timings, None

    def _sample(self, rgbas: list, seeds: list[int]) -> list[tuple[Any, str] | Exception]:
        """(tokens, level) per item, sampled as one batch. If the batch fails (say, out of
        GPU memory) every item is retried alone, so one item's failure is its own only;
        per-item generators make the retried tokens the batch's."""
        try:
            out = self.pipe(rgbas, seed=seeds, output_type="latent")
            return [(t, out.level) for t in out.latents.split(1)]
        except Exception as e:  # noqa: BLE001 - becomes the items' error rows
            if len(rgbas) == 1:
                return [e]
        return [self._sample([r], [s])[0] for r, s in zip(rgbas, seeds)]

    def _finish(self, item: dict, tokens, level: str, timings: dict) -> dict:
        """Decode, extract and write one item's mesh."""
        extraction = self.pipe.decode(tokens)
        mesh = extraction.mesh
        timings["decode_seconds"] = extraction.seconds
        if len(mesh.faces) == 0:
            return self._error(item, "no_surface", no_surface_reason(extraction.resolution), timings,
                               level=level)
        t2 = time.perf_counter()
        rel = mesh_paths(item["id"], self.formats)
        try:
            for r in rel:
                if storage.is_remote(self.output):
                    _upload_mesh(mesh, storage.join(self.output, r))
                    continue
                path = self.output / r
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_mesh_atomic(mesh, path)
        except OSError as e:
            return self._error(item, "write_error", f"{type(e).__name__}: {e}", timings, level=level)
        timings["write_seconds"] = time.perf_counter() - t2
        return _result_row(item, "ok", outputs=rel, level=level, num_vertices=len(mesh.vertices),
                           num_faces=len(mesh.faces), model=self.model_uri, worker=self.worker,
                           **timings, seconds=sum(timings.values()))

    def __call__(self, batch: pa.Table) -> pa.Table:
        """The batch's readable images are sampled together (``batch_size`` items per model
        call); loading, decoding and writing stay per item, and so do errors. An item's
        ``sample_seconds`` is its share of the batch's sampling time."""
        items = batch.to_pylist()
        loaded = [self._load(item) for item in items]
        rows = [error for _, _, error in loaded]
        todo = [i for i, row in enumerate(rows) if row is None]
        if todo:
            t0 = time.perf_counter()
            sampled = self._sample([loaded[i][0] for i in todo], [int(items[i]["seed"]) for i in todo])
            share = (time.perf_counter() - t0) / len(todo)
            for i, result in zip(todo, sampled):
                timings = loaded[i][1]
                timings["sample_seconds"] = share
                try:
                    if isinstance(result, Exception):
                        raise result
                    rows[i] = self._finish(items[i], *result, timings)
                except Exception as e:  # noqa: BLE001 - one item must never kill the job
                    rows[i] = self._internal_error(items[i], e, timings)
        return pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA)
