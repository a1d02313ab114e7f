"""Keep ``infra/requirements.lock`` (the image's exact pins) complete.

The lock must hold every package the image needs at run time: the project's own
dependencies (with their extras, e.g. ``ray[default]`` for the dashboard and Jobs API) and
everything those need, transitively. This module walks that closure through the installed
distributions' metadata, so what is checked is what pip resolved, not a hand-kept list.

    python infra/lock.py --check    # exit 1 and list what is missing or unsatisfied
    python infra/lock.py --update   # add/update the pins of missing packages from this env

``--update`` never removes lines: the lock also pins the CUDA user-space wheels (nvidia-*)
of the image's CUDA torch build, which a CPU development environment does not have.
"""
from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

LOCK = Path(__file__).with_name("requirements.lock")
PROJECT = "mar3d"


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """``{canonical name: version}`` of every ``name==version`` line."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def _applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": e}) for e in (extras or {""}))


def closure(roots: list[Requirement]) -> dict[str, list[Requirement]]:
    """Every distribution reachable from ``roots`` (with extras) in this environment:
    ``{canonical name: the requirements that asked for it}``."""
    wanted: dict[str, list[Requirement]] = {}
    seen: set[tuple[str, frozenset]] = set()
    todo = list(roots)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        wanted.setdefault(name, []).append(req)
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue  # reported by check() as missing from the environment and the lock
        for raw in requires:
            sub = Requirement(raw)
            if _applies(sub, set(req.extras)):
                todo.append(Requirement(re.sub(r";.*", "", raw)))
    return wanted


def project_requirements(extras: tuple[str, ...] = ()) -> list[Requirement]:
    """The project's runtime requirements as installed (``[test]`` only when asked)."""
    reqs = []
    for raw in metadata.requires(PROJECT) or []:
        req = Requirement(raw)
        if _applies(req, set(extras)):
            reqs.append(Requirement(re.sub(r";.*", "", raw)))
    return reqs


def check(roots: list[Requirement], pins: dict[str, str]) -> list[str]:
    """Problems: packages of the closure the lock lacks, or pins outside a requirement."""
    problems = []
    for name, reqs in sorted(closure(roots).items()):
        if name == canonicalize_name(PROJECT):
            continue
        if name not in pins:
            problems.append(f"{name}: required by {sorted({str(r) for r in reqs})} but not in the lock")
            continue
        version = Version(pins[name])
        for req in reqs:
            if req.specifier and not req.specifier.contains(version, prereleases=True):
                problems.append(f"{name}=={version}: does not satisfy {req}")
    return problems


def update(roots: list[Requirement], path: Path = LOCK) -> list[str]:
    """Add the closure's missing packages to the lock at their installed versions."""
    pins = read_lock(path)
    added = []
    for name in sorted(closure(roots)):
        if name in pins or name == canonicalize_name(PROJECT):
            continue
        try:
            added.append(f"{metadata.metadata(name)['Name']}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    if added:
        lines = path.read_text().splitlines()
        header = [ln for ln in lines if ln.startswith("#")]
        body = sorted({ln for ln in lines if ln and not ln.startswith("#")} | set(added),
                      key=lambda ln: canonicalize_name(ln.split("==")[0]))
        path.write_text("\n".join(header + body) + "\n")
    return added


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="list what the lock lacks (exit 1 if any)")
    mode.add_argument("--update", action="store_true", help="add missing pins from this environment")
    args = parser.parse_args(argv)
    roots = project_requirements()
    if args.update:
        for line in update(roots):
            print("added", line)
        return 0
    problems = check(roots, read_lock())
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
