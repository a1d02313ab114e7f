"""The model file of a release's MLflow pyfunc model (MLflow's models-from-code: MLflow
runs this file to build the model, nothing is pickled): the model class, and
``set_model``. Inputs, outputs and how the model is written: :mod:`mar3d.serving`."""
from __future__ import annotations

import base64
import os
import time
from pathlib import Path
from typing import Any

import mlflow.models
import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from mar3d import storage
from mar3d.geometry.extract import no_surface_reason
from mar3d.inference import MAR3DPipeline, load_image
from mar3d.serving import (IMAGE_COLUMN, OPTIONAL_COLUMNS, OUTPUT_COLUMNS, READ_LOCATIONS_ENV, BadRequest, cell_value,
                           image_bytes, mesh_name)


class ReleaseModel(mlflow.pyfunc.PythonModel):
    """A release's cascade behind MLflow's pyfunc interface (columns: :mod:`mar3d.serving`)."""

    def load_context(self, context) -> None:
        dirs = {name: Path(path) for name, path in context.artifacts.items()}
        self.pipe = MAR3DPipeline.from_folders(dirs, device=os.environ.get("MAR3D_SERVE_DEVICE", "auto"),
                                               use_hr="hr" in dirs, source="the release model")
        self.read_locations = os.environ.get(READ_LOCATIONS_ENV, "1") != "0"

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        try:
            output = str((params or {}).get("output_uri") or "")
            if output:
                try:
                    storage.check(output, "output_uri")
                except (storage.StorageError, OSError, ValueError) as e:
                    raise BadRequest(f"output_uri {output!r}: {e}") from None
            requests = self._requests(model_input)
            rows = [self._generate(image, rgba, settings, output) for image, rgba, settings in requests]
        except BadRequest as e:
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))

    def _requests(self, model_input) -> list[tuple[bytes, Any, dict[str, Any]]]:
        """Every row's image (file bytes, for naming a written mesh, and its decoded pixels)
        and settings, checked before any generation: one bad row refuses the request before
        time is spent on the others."""
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if IMAGE_COLUMN not in frame.columns:
            raise BadRequest(f"input has no {IMAGE_COLUMN!r} column (columns: {list(frame.columns)})")
        if frame.empty:
            raise BadRequest("input has no rows")
        requests = []
        for i, row in enumerate(frame.to_dict("records")):
            try:
                image = image_bytes(row[IMAGE_COLUMN], self.read_locations)
                rgba = load_image(image, self.pipe.config)
                settings = {name: cell_value(row, name, cast) for name, (_, cast) in OPTIONAL_COLUMNS.items()}
                self.pipe.check_settings(settings["resolution"], num_inference_steps=settings["num_inference_steps"],
                                         guidance_scale=settings["guidance_scale"])
            except (BadRequest, ValueError) as e:  # InvalidImageError is a ValueError
                raise BadRequest(f"row {i}: {e}") from None
            requests.append((image, rgba, settings))
        return requests

    def _generate(self, image: bytes, rgba, settings: dict[str, Any], output: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        out = self.pipe(rgba, seed=settings["seed"] or 0, resolution=settings["resolution"],
                        num_inference_steps=settings["num_inference_steps"],
                        guidance_scale=settings["guidance_scale"])
        mesh = out.meshes[0]
        row = {"glb_base64": "", "uri": "", "level": out.level, "num_vertices": len(mesh.vertices),
               "num_faces": len(mesh.faces), "status": "ok", "error": ""}
        if len(mesh.faces) == 0:
            row.update(status="error", error=no_surface_reason(settings["resolution"] or self.pipe.config.resolution))
        else:
            glb = mesh.export(file_type="glb")
            if output:
                row["uri"] = storage.join(output, mesh_name(image, settings))
                storage.write_bytes(row["uri"], glb)  # creates the folder
            else:
                row["glb_base64"] = base64.b64encode(glb).decode()
        row["seconds"] = time.perf_counter() - t0
        return row


mlflow.models.set_model(ReleaseModel())
