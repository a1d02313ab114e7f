from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from mar3d.config import ConfigError, flatten, from_dict, load_config, to_dict


@dataclass
class Inner:
    width: int = 64
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str = "x"
    rate: float = 1e-3
    sizes: tuple[int, ...] = (16, 4)
    inner: Inner = field(default_factory=Inner)
    path: Optional[str] = None

    def validate(self):
        if self.rate <= 0:
            raise ValueError("rate must be > 0")


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: y\ninner:\n  width: 128\n")
    cfg = load_config(Outer, f, ["inner.mode=b", "sizes=[8,2,1]", "rate=2"])
    assert cfg.name == "y" and cfg.inner.width == 128 and cfg.inner.mode == "b"
    assert cfg.sizes == (8, 2, 1) and cfg.rate == 2.0 and isinstance(cfg.rate, float)


def test_unknown_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(Outer, None, ["inner.depth=3"])


@pytest.mark.parametrize("override,match", [
    ("inner.width=abc", "expected an integer"),
    ("inner.mode=c", "is not one of"),
    ("sizes=3", "expected a list"),
    ("nokey", "must look like"),
])
def test_bad_values_rejected(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(Outer, None, [override])


def test_validate_is_called():
    with pytest.raises(ValueError, match="rate must be > 0"):
        load_config(Outer, None, ["rate=-1"])


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_roundtrip_and_flatten():
    cfg = Outer()
    assert from_dict(Outer, to_dict(cfg)) == cfg
    flat = flatten(cfg)
    assert flat["inner.width"] == 64 and flat["sizes"] == [16, 4]


# ------------------------------------------------------------------ references

def _write(folder, files: dict[str, str]):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def test_a_block_may_reference_another_files_block(tmp_path, monkeypatch):
    conf = _write(tmp_path / "conf", {
        "shared.yaml": "small:\n  width: 8\nlarge:\n  width: 512\n  mode: b\n",
        "inner.yaml": "width: 16\n",
        "run.yaml": "name: run\ninner: shared.yaml#large\n",
        "whole.yaml": "inner: inner.yaml\n",
        "alias.yaml": "inner: links.yaml#default\n",
        "links.yaml": "default: shared.yaml#small\n"})
    monkeypatch.chdir(tmp_path)  # references resolve next to the referencing file, not here
    cfg = load_config(Outer, conf / "run.yaml", ["inner.mode=a"])
    assert (cfg.name, cfg.inner) == ("run", Inner(width=512, mode="a"))
    assert load_config(Outer, conf / "whole.yaml").inner == Inner(width=16)
    assert load_config(Inner, conf / "shared.yaml", section="small") == Inner(width=8)
    # A referenced block may itself be a reference.
    assert load_config(Outer, conf / "alias.yaml").inner == Inner(width=8)
    assert load_config(Inner, conf / "links.yaml", section="default") == Inner(width=8)


def test_only_nested_config_fields_take_references(tmp_path):
    conf = _write(tmp_path, {"a.yaml": "name: other.yaml\ninner: just text\n"})
    with pytest.raises(ConfigError, match="expected a mapping for Inner"):
        load_config(Outer, conf / "a.yaml")
    (conf / "b.yaml").write_text("name: other.yaml\n")
    assert load_config(Outer, conf / "b.yaml").name == "other.yaml"


@pytest.mark.parametrize("files, match", [
    ({"a.yaml": "inner: missing.yaml\n"}, "reference 'missing.yaml'.*does not exist"),
    ({"a.yaml": "inner: b.yaml#nope\n", "b.yaml": "x: {}\n"}, "b.yaml has no top-level section 'nope'"),
    ({"a.yaml": "inner: b.yaml#x\n", "b.yaml": "x: b.yaml#y\ny: b.yaml#x\n"}, "reference cycle: .*b.yaml#x -> .*b.yaml#y -> .*b.yaml#x"),
    ({"a.yaml": "inner: b.yaml#x\n", "b.yaml": "x: [1, 2]\n"}, "b.yaml#x: must be a mapping"),
])
def test_bad_references_are_clear_errors(tmp_path, files, match):
    conf = _write(tmp_path, files)
    with pytest.raises(ConfigError, match=match):
        load_config(Outer, conf / "a.yaml")
