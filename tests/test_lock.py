"""The image's lock (infra/requirements.lock) holds everything the code needs at run time.

A KubeRay head built from a lock without ray[default]'s packages has no dashboard and no
Jobs API, and every pipeline step submitted to it fails; these checks read the installed
distributions' own metadata, so a new dependency (or extra) cannot be forgotten again.
"""
from __future__ import annotations

import importlib.util
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def _lock_module():
    spec = importlib.util.spec_from_file_location("mar3d_infra_lock", REPO / "infra" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_lock_satisfies_ray_default_at_the_pinned_ray_version():
    lock = _lock_module()
    pins = lock.read_lock()
    assert pins["ray"] == metadata.version("ray"), "the lock pins another ray than the one tested"
    roots = [Requirement(f"ray[default]=={pins['ray']}")]
    needed = lock.closure(roots)
    # The Jobs API's server side: without these the head starts in "minimal mode".
    assert {"aiohttp", "aiohttp-cors", "opencensus", "prometheus-client", "py-spy"} <= set(needed)
    assert lock.check(roots, pins) == []


def test_lock_covers_the_projects_runtime_closure():
    lock = _lock_module()
    roots = lock.project_requirements()
    assert any(r.name == "ray" and "default" in r.extras for r in roots), \
        "pyproject must depend on ray[default] (dashboard + Jobs API)"
    assert lock.check(roots, lock.read_lock()) == []


def test_check_reports_a_missing_and_an_unsatisfied_pin():
    lock = _lock_module()
    pins = lock.read_lock()
    roots = [Requirement(f"ray[default]=={pins['ray']}")]
    broken = {k: v for k, v in pins.items() if k != "aiohttp-cors"}
    broken["aiohttp"] = "0.1"
    problems = lock.check(roots, broken)
    assert any(p.startswith("aiohttp-cors:") and "not in the lock" in p for p in problems)
    assert any(p.startswith("aiohttp==0.1: does not satisfy") for p in problems)
