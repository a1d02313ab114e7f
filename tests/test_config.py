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
