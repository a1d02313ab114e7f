"""Load: batch generation over 200 small images (190 valid, 10 broken) with 2 actors, one
of them SIGKILLed mid-job. Every item must be accounted for: exactly one result row per
image, a mesh file for every ``ok`` row, an error row with a reason for every broken
image, and a re-run that finds nothing left to do."""
from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mar3d.generate import RESULTS, GenerateConfig, batch_generate, read_results
from mar3d.inference import PipelineConfig
from mar3d.models.mar import SamplingConfig

from _tiny_release import write_tiny_release
from _faults import Background, processes, wait_for

pytestmark = pytest.mark.e2e

NUM_IMAGES, NUM_BROKEN = 200, 10


def _write_images(root: Path) -> None:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES - NUM_BROKEN):
        size = int(rng.integers(32, 49))
        arr = np.full((size, size, 3), 255, np.uint8)
        lo, hi = sorted(rng.integers(4, size - 4, 2))
        arr[lo:hi + 1, lo:hi + 1] = rng.integers(0, 200, 3, dtype=np.uint8)
        Image.fromarray(arr).save(root / f"img_{i:03d}.png")
    for i in range(NUM_BROKEN):
        (root / f"broken_{i:02d}.png").write_bytes(rng.bytes(64 + i))


def test_200_images_two_actors_one_killed_every_item_accounted_for(ray_local, tmp_path, reliability_report):
    images, out = tmp_path / "images", tmp_path / "out"
    _write_images(images)
    release = write_tiny_release(tmp_path / "release")
    fast = SamplingConfig(num_inference_steps=4, diffusion_steps=5)
    cfg = GenerateConfig(pipeline=PipelineConfig(sampling=fast, resolution=32),
                         num_actors=2, cpus_per_actor=0.5, batch_size=4, checkpoint_seconds=2)
    cfg.validate()
    t0 = time.monotonic()
    job = Background(lambda: batch_generate(str(images), str(release), str(out), cfg, progress=False))

    def partial_results() -> int:
        try:
            return read_results(out).num_rows if (out / RESULTS).is_file() else 0
        except OSError:
            return 0

    done_at_kill = wait_for(lambda: (n := partial_results()) >= 20 and n, 600, "20 results")
    actors = processes("_GeneratorActor")
    assert actors, "no generation actor process found"
    actors[0].send_signal(signal.SIGKILL)

    result = job.join(900)
    seconds = time.monotonic() - t0
    assert job.error is None, job.error
    rows = read_results(out).to_pylist()
    ids = [r["id"] for r in rows]
    assert len(rows) == len(set(ids)) == NUM_IMAGES == result.total
    ok = [r for r in rows if r["status"] == "ok"]
    errors = [r for r in rows if r["status"] != "ok"]
    assert len(ok) == NUM_IMAGES - NUM_BROKEN, [r["error"] for r in errors if "broken" not in r["id"]][:3]
    assert all(r["reason"] == "invalid_image" and r["id"].startswith("broken_") for r in errors)
    for r in ok:
        assert r["outputs"] and all((out / rel).is_file() for rel in r["outputs"]), r["id"]
    assert not list(out.rglob("*.tmp*"))
    assert len({r["worker"] for r in ok}) >= 2  # both actors (and the restarted one) worked

    again = batch_generate(str(images), str(release), str(out), cfg, progress=False)
    assert (again.succeeded, again.failed, again.skipped) == (0, 0, NUM_IMAGES)
    reliability_report.add("load", job="batch generation, 2 actors, one SIGKILLed after "
                           f"{done_at_kill} results", items=NUM_IMAGES, ok=len(ok), error_rows=len(errors),
                           lost=NUM_IMAGES - len(rows), seconds=f"{seconds:.0f}",
                           items_per_s=f"{NUM_IMAGES / seconds:.2f}")
