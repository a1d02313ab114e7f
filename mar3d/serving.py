"""A release as an MLflow pyfunc model, so MLflow's own verbs run it.

Every release version's artifact folder (``runs:/<release run>/release``, the source of
``models:/mar3d/<version>``) is an MLflow model: ``mlflow models predict -m
models:/mar3d@champion``, ``mlflow models serve``, ``mlflow.pyfunc.load_model`` and
``spark_udf`` all work on the same URI the gate promotes, so the pyfunc follows the
release's aliases by construction. It is built from code (MLflow's models-from-code:
:mod:`mar3d.serving_model` is the model file and holds the model class, nothing is
pickled); its artifacts are copies
of the release's model folders (``vae``, ``cond``, ``lr``, ``hr``: safetensors + config),
and the ``mar3d`` package travels with it (``code/``), so an environment built from its
requirements needs nothing else.

Input rows (a DataFrame, or ``dataframe_records`` / ``inputs`` over REST):

* ``image`` -- base64 bytes of an image file (a ``data:image/...;base64,`` URL too), or a
  path / ``file://`` / ``s3://`` URI the serving process can read
  (``MAR3D_SERVE_READ_LOCATIONS=0`` refuses these: base64 only);
* optional ``seed``, ``num_inference_steps``, ``guidance_scale``, ``resolution``
  (marching-cubes cells per axis); absent or null: the models' own defaults.

Output rows: ``glb_base64`` (the mesh as binary glTF), or, with the ``output_uri`` param
(a folder or ``s3://`` prefix), ``uri`` of the written GLB and an empty ``glb_base64``;
``level``, ``num_vertices``, ``num_faces``, ``seconds``, ``status`` (``ok`` | ``error``)
and ``error`` (why no mesh came out: the decoded field had no surface).

An input the model cannot use (an unreadable image, a bad setting) refuses the whole
request with its row and reason: MLflow's scoring server answers 400, not 500.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import importlib.metadata
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_COLUMN = "image"
# Optional per-row settings: column -> (MLflow type, cast). Numbers are doubles in the
# signature, integers included: MLflow turns a column that some records leave out into
# floats with NaN, which it cannot cast to long (and refuses the request).
OPTIONAL_COLUMNS = {"seed": ("double", int), "num_inference_steps": ("double", int),
                    "guidance_scale": ("double", float), "resolution": ("double", int)}
OUTPUT_COLUMNS = {"glb_base64": "string", "uri": "string", "level": "string", "num_vertices": "long",
                  "num_faces": "long", "seconds": "double", "status": "string", "error": "string"}
READ_LOCATIONS_ENV = "MAR3D_SERVE_READ_LOCATIONS"
CODE_FILE = Path(__file__).with_name("serving_model.py")
RELEASE_FILE = "release.json"
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


class BadRequest(ValueError):
    """An input row the model cannot use; MLflow answers it with 400 and this reason."""


def signature():
    """The release model's signature: the columns above, plus the ``output_uri`` param."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", IMAGE_COLUMN)]
                    + [ColSpec(kind, name, required=False) for name, (kind, _) in OPTIONAL_COLUMNS.items()])
    outputs = Schema([ColSpec(kind, name) for name, kind in OUTPUT_COLUMNS.items()])
    return ModelSignature(inputs=inputs, outputs=outputs,
                          params=ParamSchema([ParamSpec("output_uri", "string", "")]))


def example_image_png(size: int = 64) -> bytes:
    """A grey ball on white: the input example (any RGB image is a valid input)."""
    from PIL import Image

    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(xx - size / 2, yy - size / 2)
    shade = np.clip(200 - 120 * r / (size / 3), 60, 200).astype(np.uint8)
    rgb = np.where((r < size / 3)[..., None], shade[..., None].repeat(3, -1), 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def input_example():
    import pandas as pd

    return pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(example_image_png()).decode()], "seed": [0]})


def image_bytes(value: Any, read_locations: bool = True) -> bytes:
    """One ``image`` cell -> the image file's bytes (see the module docstring)."""
    from mar3d import storage

    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"image must be base64 image bytes or a path/URI, got {type(value).__name__} "
                         f"{str(value)[:40]!r}")
    value = value.strip()
    if _DATA_URL.match(value):
        value = value.split(",", 1)[1]
    elif value.startswith(("s3://", "file://")) or _is_local_file(value):
        if not read_locations:
            raise BadRequest(f"image {value[:200]!r} is a path/URI and this server reads base64 images "
                             f"only ({READ_LOCATIONS_ENV}=0)")
        location = value[len("file://"):] if value.startswith("file://") else value
        try:
            return storage.read_bytes(location)
        except (OSError, storage.StorageError) as e:
            raise BadRequest(f"image {value[:200]!r} cannot be read: {e}") from e
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"image {value[:60]!r}{'...' if len(value) > 60 else ''} is neither base64 image "
                         "bytes nor a path/URI this server can read") from None


def _is_local_file(value: str) -> bool:
    try:
        return len(value) < 4096 and Path(value).is_file()
    except (OSError, ValueError):
        return False


def cell_value(row, name: str, cast):
    value = row.get(name)
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{name} must be a number, got {value!r}") from None
    if cast is int and not number.is_integer():
        raise BadRequest(f"{name} must be an integer, got {value!r}")
    return cast(number)


def mesh_name(image: bytes, settings: dict[str, Any]) -> str:
    """A written mesh's name: the same image and settings give the same name (and mesh)."""
    digest = hashlib.sha256(image + json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return f"{digest[:20]}.glb"


def requirements() -> list[str]:
    """The serving environment's pip requirements: mar3d's own runtime dependencies
    (mar3d itself travels as code)."""
    try:
        required = importlib.metadata.requires("mar3d") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return [r for r in required if "extra ==" not in r]


def save_release_model(path: str | Path, component_dirs: dict[str, Path], release_doc: dict) -> Path:
    """Write the release's MLflow model to ``path`` (which must not exist): the model file,
    the component folders as artifacts, the mar3d package as code, signature, input example
    and ``release.json``."""
    import mlflow.pyfunc

    import mar3d

    path = Path(path)
    mlflow.pyfunc.save_model(
        path=str(path), python_model=str(CODE_FILE),
        artifacts={name: str(folder) for name, folder in component_dirs.items()},
        code_paths=[str(Path(mar3d.__file__).parent)], signature=signature(),
        input_example=input_example(), pip_requirements=requirements())
    (path / RELEASE_FILE).write_text(json.dumps(release_doc, indent=2))
    return path
