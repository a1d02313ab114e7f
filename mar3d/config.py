"""Typed configuration: dataclasses loadable from YAML with dotted CLI overrides.

Every stage owns its config dataclass next to the code that uses it (nanoGPT style);
this module only knows how to fill any such dataclass from YAML and ``a.b=value``
overrides, and how to turn it back into plain data for logging.

Presets: the YAML files in ``mar3d/configs/`` ship inside the package (package data), so
they are found the same way in a source checkout and in an installed wheel. Wherever a
config file is expected (``load_config``, every ``--config`` flag), a path to an existing
file is used as given; otherwise a bare name is looked up among the presets, with or
without ``.yaml`` (``train_vae_tiny`` or ``train_vae_tiny.yaml``). :func:`presets` lists them.

References: where a field holds a nested config dataclass, the YAML value may be a string
naming another file's block instead of a copy of it -- ``vae: vae_paper.yaml`` (the whole
file) or ``mar: mar_paper.yaml#lr`` (its top-level ``lr`` section). The file is resolved
relative to the referencing file's folder, then among the presets; a referenced block may
itself be such a string. Missing files or sections and reference cycles are errors.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml

T = TypeVar("T")

# Package data (pyproject.toml), next to this module: no lookup outside the package.
PRESET_DIR = Path(__file__).resolve().parent / "configs"
# Whole-pipeline presets (read by the deployment layer's pipelines/presets.py).
PIPELINE_PRESET_DIR = PRESET_DIR / "pipeline"
# A reference to another file's block: "file.yaml" or "file.yaml#section".
_REFERENCE = re.compile(r"(?P<file>[^#]+\.yaml)(?:#(?P<section>[^#]+))?")


class ConfigError(ValueError):
    """A config file or override that does not match the dataclass it targets."""


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for a in non_none:
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} matches none of {non_none}: {errors}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        seq = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(seq) if origin is tuple else seq
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Path:
        return Path(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build ``cls`` from a mapping, rejecting unknown keys and wrongly typed values."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    types = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(
            f"{where or cls.__name__}: unknown key(s) {sorted(unknown)}; valid keys: {sorted(names)}"
        )
    kwargs = {k: _coerce(v, types[k], f"{where + '.' if where else ''}{k}") for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> Any:
    """Plain YAML/JSON-able data from a (nested) config dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` view of a config, e.g. for MLflow params."""
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    return key, yaml.safe_load(raw) if raw.strip() else ""


def presets() -> list[str]:
    """Names of the shipped presets (``mar3d/configs/*.yaml`` without the suffix)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def pipeline_presets() -> list[str]:
    """Names of the shipped pipeline presets (``mar3d/configs/pipeline/*.yaml``)."""
    return sorted(p.stem for p in PIPELINE_PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    """The file of the shipped preset ``name`` (with or without ``.yaml``)."""
    path = PRESET_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if Path(name).name != name or not path.is_file():
        raise ConfigError(f"{name!r} is not a preset; presets: {', '.join(presets())}")
    return path


def config_path(ref: str | Path, base: Path | None = None) -> Path:
    """The YAML file ``ref`` names: an existing file (relative to ``base`` if given, else to
    the working folder), or else a preset name."""
    path = Path(base) / ref if base is not None else Path(ref)
    if path.is_file():
        return path
    try:
        return preset_path(str(ref))
    except ConfigError as e:
        raise ConfigError(f"config file {path} does not exist and {e}") from None


def read_config(cls: type, path: str | Path, section: str | None = None) -> dict[str, Any]:
    """The YAML mapping of ``path`` (a file or preset name; only its top-level ``section``
    if given) for ``cls``, with references to other files' blocks resolved."""
    return _read_block(cls, config_path(path), section, ())


def _read_block(cls: type, path: Path, section: str | None, chain: tuple[str, ...]) -> dict[str, Any]:
    path = path.resolve()
    where = f"{path}#{section}" if section else str(path)
    if where in chain:
        raise ConfigError(f"reference cycle: {' -> '.join([*chain, where])}")
    chain = (*chain, where)
    block = yaml.safe_load(path.read_text()) or {}
    if section is not None:
        if not isinstance(block, dict) or section not in block:
            raise ConfigError(f"{path} has no top-level section {section!r}")
        block = block[section]
    if isinstance(block, str) and _REFERENCE.fullmatch(block):
        return _read_reference(cls, block, path.parent, chain)
    if not isinstance(block, dict):
        raise ConfigError(f"{where}: must be a mapping (or a reference like other.yaml#section), got {block!r}")
    return _resolve_references(cls, block, path.parent, chain)


def _read_reference(cls: type, ref: str, base: Path, chain: tuple[str, ...]) -> dict[str, Any]:
    match = _REFERENCE.fullmatch(ref)
    try:
        path = config_path(match["file"], base)
    except ConfigError as e:
        raise ConfigError(f"{chain[-1]}: reference {ref!r}: {e}") from None
    return _read_block(cls, path, match["section"], chain)


def _resolve_references(cls: type, block: dict[str, Any], base: Path,
                        chain: tuple[str, ...]) -> dict[str, Any]:
    """``block`` with every value of a nested-dataclass field that is a reference string
    replaced by the mapping it names (other keys are left for ``from_dict`` to check)."""
    types = _field_types(cls)
    out = dict(block)
    for key, value in block.items():
        tp = types.get(key)
        if not dataclasses.is_dataclass(tp):
            continue
        if isinstance(value, str) and _REFERENCE.fullmatch(value):
            out[key] = _read_reference(tp, value, base, chain)
        elif isinstance(value, dict):
            out[key] = _resolve_references(tp, value, base, chain)
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = (),
                section: str | None = None) -> T:
    """Defaults of ``cls``, updated by the YAML file or preset ``path`` (optionally one
    top-level ``section`` of it), then by ``key.sub=value`` overrides. Unknown keys are
    errors, not ignored."""
    data = to_dict(cls())
    if path is not None:
        _deep_update(data, read_config(cls, path, section))
    for ov in overrides:
        key, value = parse_override(ov)
        _set_dotted(data, key, value)
    return from_dict(cls, data)


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)
