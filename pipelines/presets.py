"""Pipeline presets: the pipeline parameters of each size, one YAML file each beside the
config presets (``mar3d/configs/pipeline/{smoke,tiny,small,paper}.yaml``).

A preset names the config preset of every step (``data_config`` ... ``generate_config``,
"" for the library's defaults), per-step overrides, the training workers, and the
promotion gate's bounds. The local run (`mar3d pipeline run`), the Kubeflow pipeline's
parameter defaults (the ``paper`` preset) and `mar3d pipeline submit --preset` all read
these files, so a size means the same everywhere.

Two keys are not parameters: ``base`` (start from another preset, then apply this file's
keys) and ``train_length_factor`` (train every stage that many times as long: steps,
warm-up and the checkpoint/eval intervals scale together; the models stay the same).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mar3d import config
from mar3d.config import ConfigError, config_path, pipeline_presets

DEFAULT_PRESET = "paper"  # the Kubeflow pipeline's defaults: a GPU cluster
STEPS = ("data", "vae", "lr", "hr", "eval", "generate")
TRAIN_STAGES = ("vae", "lr", "hr")
# The pipeline parameters a preset may set, with their types.
PARAMETERS: dict[str, type] = {
    **{f"{step}_config": str for step in STEPS},
    **{f"{step}_overrides": list for step in STEPS},
    "num_workers": int, "use_gpu": bool,
    "gate_max_chamfer": float, "gate_min_fscore": float, "gate_beat_baseline": bool,
}
# Training-length keys of TrainConfig that scale together with train_length_factor.
SCALED_KEYS = ("steps", "warmup_steps", "checkpoint_every", "eval_every")


def scaled_steps(config: str | Path, factor: float) -> list[str]:
    """Overrides that train ``config``'s run (a file or preset) ``factor`` x as long
    (intervals keep their share of the run)."""
    import yaml

    doc = yaml.safe_load(config_path(config).read_text()) or {}
    return [f"{key}={max(1, round(doc[key] * factor))}" for key in SCALED_KEYS if doc.get(key)]


def _is_a(value: Any, tp: type) -> bool:
    """YAML's own types only: "false" is not a bool, a bool is not a number."""
    if tp is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _read(name: str, chain: tuple[str, ...] = ()) -> dict[str, Any]:
    import yaml

    path = config.PIPELINE_PRESET_DIR / f"{name}.yaml"
    if Path(name).name != name or not path.is_file():
        raise ConfigError(f"unknown pipeline preset {name!r}; presets: {', '.join(pipeline_presets())}")
    if name in chain:
        raise ConfigError(f"pipeline preset {name!r} is its own base ({' -> '.join((*chain, name))})")
    doc = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(doc) - set(PARAMETERS) - {"base", "train_length_factor"})
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; a pipeline preset sets {sorted(PARAMETERS)}")
    base = _read(doc.pop("base"), (*chain, name)) if "base" in doc else {}
    return {**base, **doc}


def _expected(tp: type) -> str:
    """What a parameter of type ``tp`` must be, for an error message."""
    return "a list of 'key=value' strings" if tp is list else f"of type {tp.__name__}"


def check_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """``arguments`` (a user's ``--arg`` values) when every name is a preset parameter
    with a value of its type; a ConfigError naming the first one that is not."""
    for key, value in arguments.items():
        if key not in PARAMETERS:
            raise ConfigError(f"unknown pipeline argument {key!r}; arguments: {', '.join(sorted(PARAMETERS))}")
        tp = PARAMETERS[key]
        if not _is_a(value, tp):
            raise ConfigError(f"pipeline argument {key} must be {_expected(tp)} (JSON), got {value!r}")
    return arguments


def pipeline_preset(name: str) -> dict[str, Any]:
    """The pipeline arguments of preset ``name``: every key of :data:`PARAMETERS`, with
    config presets by name (components resolve names, on any machine)."""
    doc = _read(name)
    factor = doc.pop("train_length_factor", None)
    missing = sorted(set(PARAMETERS) - set(doc) - {f"{s}_overrides" for s in STEPS})
    if missing:
        raise ConfigError(f"pipeline preset {name!r} does not set {missing}")
    args: dict[str, Any] = {}
    for key, tp in PARAMETERS.items():
        value = doc.get(key, [])
        if value is None and tp is str:
            value = ""  # an empty `eval_config:` means the library's defaults
        if not _is_a(value, tp):
            raise ConfigError(f"pipeline preset {name!r}: {key} must be {_expected(tp)}, got {value!r}")
        args[key] = list(value) if tp is list else tp(value)
    if factor is not None:
        for stage in TRAIN_STAGES:
            args[f"{stage}_overrides"] = (scaled_steps(args[f"{stage}_config"], float(factor))
                                          + args[f"{stage}_overrides"])
    return args
