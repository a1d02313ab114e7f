"""The setting that comes with an object: skyboxes, ground planes and backdrops.

Published scenes often carry their setting along with the object: a skybox (a large
box or sphere around everything, its faces turned inward) or a ground plane or backdrop
a hundred times the object's size. Flattened and normalized as one mesh, the object
then shrinks to a few pixels inside a box or on a plane and the row shows "one solid
box". :func:`scenery_parts` finds such parts so that the loader drops them (the row's
``notes`` say what was dropped and why), and refuses a scene it cannot decide.

A part is scenery only when it dwarfs the rest: its bounding box is at least
``DWARF_RATIO`` times larger than the bounding box of everything smaller than it
together (so six separate skybox faces and a ground plane go as one setting, and an
object made of many parts stays whole). Of such parts:

- a flat one (thinner than ``FLAT_FRACTION`` of its size along its thinnest principal
  axis) is a ground plane, a backdrop wall or a skybox face: dropped;
- parts that together surround the rest (rays from its centre hit them in every
  direction) are a skybox when their faces turn inward, towards the rest: dropped. When
  they turn outward they may as well be a closed container with something small inside,
  so they are dropped only beyond ``SURE_RATIO`` and refused (``ambiguous_scene``) below;
- anything else (a large body with a small detail, a car and its badge) is the object,
  kept.

A scene of one part is never touched: a lone plane stays a plane.
"""
from __future__ import annotations

import itertools

import numpy as np
import trimesh

from .errors import MeshError

DWARF_RATIO = 10.0
FLAT_FRACTION = 0.02
SURE_RATIO = 100.0
# Directions to the 26 neighbours of a cube cell: a shell with a hole wider than ~45 degrees
# (a room without a ceiling, a bowl) is not "around" the rest.
_DIRECTIONS = np.array([d for d in itertools.product((-1.0, 0.0, 1.0), repeat=3) if any(d)])
_DIRECTIONS /= np.linalg.norm(_DIRECTIONS, axis=1, keepdims=True)


def part_box(part: trimesh.Trimesh) -> np.ndarray:
    """[2, 3] (min, max) of the vertices the part's faces use."""
    used = np.asarray(part.vertices)[np.unique(np.asarray(part.faces))]
    return np.stack([used.min(0), used.max(0)])


def box_size(box: np.ndarray) -> float:
    return float((box[1] - box[0]).max())


def setting_split(boxes: list[np.ndarray]) -> tuple[list[int], list[int]] | None:
    """(big parts, the rest) where every big part is ``DWARF_RATIO`` times larger than the
    rest's bounding box together, with as few big parts as possible; None when no part
    dwarfs the others."""
    sizes = np.array([box_size(b) for b in boxes])
    order = list(np.argsort(-sizes, kind="stable"))
    # Bounding box of order[k:] for every k, from the smallest part up.
    rest = np.stack([boxes[i] for i in order])
    lows = np.minimum.accumulate(rest[::-1, 0], axis=0)[::-1]
    highs = np.maximum.accumulate(rest[::-1, 1], axis=0)[::-1]
    for k in range(1, len(order)):
        rest_size = float((highs[k] - lows[k]).max())
        if rest_size > 0 and sizes[order[k - 1]] >= DWARF_RATIO * rest_size:
            return [int(i) for i in order[:k]], [int(i) for i in order[k:]]
    return None


def is_flat(part: trimesh.Trimesh) -> bool:
    """Thinner than ``FLAT_FRACTION`` of its size along its thinnest principal axis (a
    plane, a slab, a wall; tilted ones too)."""
    used = np.asarray(part.vertices, np.float64)[np.unique(np.asarray(part.faces))]
    centred = used - used.mean(0)
    _, _, axes = np.linalg.svd(centred.T @ centred)
    extents = np.ptp(centred @ axes.T, axis=0)
    return bool(extents.min() <= FLAT_FRACTION * extents.max())


def enclosure(parts: list[trimesh.Trimesh], centre: np.ndarray) -> tuple[bool, float]:
    """(whether rays from ``centre`` hit ``parts`` in every direction, the fraction of
    those hits whose face turns towards ``centre``)."""
    from trimesh.ray.ray_pyembree import RayMeshIntersector

    offsets = np.cumsum([0] + [len(p.vertices) for p in parts])[:-1]
    shell = trimesh.Trimesh(np.concatenate([np.asarray(p.vertices) for p in parts]),
                            np.concatenate([np.asarray(p.faces) + o for p, o in zip(parts, offsets)]),
                            process=False)
    first = RayMeshIntersector(shell).intersects_first(np.repeat(centre[None], len(_DIRECTIONS), 0),
                                                       _DIRECTIONS)
    if (first < 0).any():
        return False, 0.0
    facing = np.einsum("ij,ij->i", shell.face_normals[first], _DIRECTIONS)
    return True, float((facing < 0).mean())


def scenery_parts(parts: list[trimesh.Trimesh], names: list[str]) -> list[tuple[int, str]]:
    """(index, why) of every part of a flattened scene that is its setting, not the
    object (see the module docstring), found layer by layer from the outside (a skybox,
    then the ground plane it held); raises ``MeshError("ambiguous_scene")`` for a shell
    that may be a skybox or a container."""
    found: list[tuple[int, str]] = []
    kept = list(range(len(parts)))
    while True:
        layer = outer_scenery([parts[i] for i in kept], [names[i] for i in kept])
        if not layer:
            return found
        found += [(kept[i], why) for i, why in layer]
        dropped = {kept[i] for i, _ in layer}
        kept = [i for i in kept if i not in dropped]


def outer_scenery(parts: list[trimesh.Trimesh], names: list[str]) -> list[tuple[int, str]]:
    """(index, why) of the parts that dwarf all the others and are scenery."""
    if len(parts) < 2:
        return []
    boxes = [part_box(p) for p in parts]
    split = setting_split(boxes)
    if split is None:
        return []
    big, rest = split
    rest_box = np.stack([np.min([boxes[i][0] for i in rest], 0), np.max([boxes[i][1] for i in rest], 0)])
    rest_size = box_size(rest_box)

    def ratio(indices) -> float:
        return max(box_size(boxes[i]) for i in indices) / rest_size

    dropped = [(i, f"flat, {ratio([i]):.0f}x the size of the rest of the scene (a ground plane or backdrop)")
               for i in big if is_flat(parts[i])]
    solid = [i for i in big if i not in {d[0] for d in dropped}]
    if not solid:
        return dropped
    around, inward = enclosure([parts[i] for i in big], rest_box.mean(0))
    if not around:
        return dropped  # a large body with small details: the object itself
    shown = ", ".join(repr(names[i]) for i in solid)
    if inward >= 0.5:
        why = f"surrounds the rest of the scene facing it, {ratio(solid):.0f}x its size (a skybox)"
    elif ratio(solid) >= SURE_RATIO:
        why = f"surrounds the rest of the scene, {ratio(solid):.0f}x its size (a skybox)"
    else:
        raise MeshError("ambiguous_scene", f"{shown} surrounds the rest of the scene, {ratio(solid):.0f}x "
                                           f"its size, facing outward: a skybox or a container with "
                                           f"something small inside, which cannot be told apart")
    return dropped + [(i, why) for i in solid]
