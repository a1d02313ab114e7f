"""Model weights on disk: one folder = ``model.safetensors`` + ``config.yaml`` (+ ``MLmodel``).

This is the only format trained weights leave a training run in, and the only one the
registry and the inference code read. It never pickles: tensors go through
safetensors, everything else is YAML, so loading a model from an untrusted folder
cannot execute code.

``config.yaml`` holds::

    format: mar3d-weights/v1
    kind: vae | cond | lr | hr         # which model the tensors belong to (cond: the
                                       # frozen image encoder one release shares)
    model: {...}                       # the model config dataclass as plain data
    extra: {...}                       # anything else worth keeping (condition config,
                                       # training step, source run id, ...)

The folder is also a valid MLflow model: :func:`save_model_dir` writes an ``MLmodel``
file with a custom ``mar3d`` flavor that points at the two files above, so MLflow's UI
and ``mlflow.models.Model.load`` recognise it, without a pickled pyfunc wrapper.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

FORMAT = "mar3d-weights/v1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
MLMODEL_FILE = "MLmodel"
KINDS = ("vae", "cond", "lr", "hr")


def content_id(state_dict: dict[str, Any]) -> str:
    """Identity of a set of weights: sha256 over every tensor's name, dtype, shape and
    bytes (sorted by name). Equal weights give equal ids however they were made."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def save_model_dir(directory: str | Path, state_dict: dict[str, Any], config: dict[str, Any],
                   kind: str, extra: dict[str, Any] | None = None) -> Path:
    """Write ``state_dict`` (name -> tensor) and its plain-data ``config`` to ``directory``."""
    import torch
    from safetensors.torch import save_file

    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")
    if not isinstance(config, dict):
        raise TypeError(f"config must be plain data (a dict), got {type(config).__name__}")
    tensors = {}
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(value).__name__}, not a tensor")
        # safetensors refuses shared or non-contiguous storage; detached contiguous
        # CPU copies are what a checkpoint should hold anyway.
        tensors[name] = value.detach().to("cpu").contiguous().clone()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT, "kind": kind})
    doc = {"format": FORMAT, "kind": kind, "model": config, "extra": extra or {}}
    (directory / CONFIG_FILE).write_text(yaml.safe_dump(doc, sort_keys=False))
    _write_mlmodel(directory, kind)
    return directory


def _write_mlmodel(directory: Path, kind: str) -> None:
    from mar3d import __version__

    doc = {
        "flavors": {"mar3d": {"kind": kind, "weights": WEIGHTS_FILE, "config": CONFIG_FILE,
                              "format": FORMAT, "mar3d_version": __version__,
                              "loader": "mar3d.weights.load_model_dir"}},
    }
    (directory / MLMODEL_FILE).write_text(yaml.safe_dump(doc, sort_keys=False))


def load_model_dir(directory: str | Path, kind: str | None = None,
                   device: str = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a folder written by :func:`save_model_dir` -> ``(state_dict, config_doc)``.

    ``config_doc`` is the whole ``config.yaml`` (``kind``, ``model``, ``extra``). When
    ``kind`` is given, a folder holding another kind of model is an error."""
    from safetensors.torch import load_file

    directory = Path(directory)
    weights, config = directory / WEIGHTS_FILE, directory / CONFIG_FILE
    for path in (weights, config):
        if not path.is_file():
            raise FileNotFoundError(f"{directory} is not a mar3d model folder: {path.name} is missing")
    doc = yaml.safe_load(config.read_text())
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{config}: not a {FORMAT} config (format={doc.get('format') if isinstance(doc, dict) else doc!r})")
    if kind is not None and doc.get("kind") != kind:
        raise ValueError(f"{directory} holds a {doc.get('kind')!r} model, expected {kind!r}")
    return load_file(str(weights), device=device), doc
