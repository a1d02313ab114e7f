"""Why a mesh cannot become a dataset row: ``MeshError(reason_code, message)``, with the
reason codes a closed set (``REASONS``) that reports can count. Shared by the checks
before loading (preflight.py) and after (mesh_io.py, watertight.py, prepare/)."""
from __future__ import annotations

REASONS = {
    "not_found": "the input path does not exist or is not a file, or a requested source uid "
                 "is not listed by the Objaverse tree or table",
    "path_outside_root": "a manifest entry escapes the manifest's root directory",
    "invalid_path": "a manifest entry is not a usable path (NUL byte, name too long)",
    "unsupported_format": "the file suffix is not a supported mesh format",
    "sha256_mismatch": "the file's sha256 differs from the one its Objaverse-XL table lists",
    "file_too_large": "the file is larger than DataConfig.max_file_bytes",
    "unreadable": "the mesh loader raised (truncated, corrupt or not a mesh file)",
    "empty": "no triangles after flattening the scene",
    "nonfinite_vertices": "vertices contain NaN or Inf",
    "invalid_faces": "face indices out of range",
    "unsupported_extension": "a glTF file requires an extension the loader does not implement "
                             "(e.g. KHR_texture_basisu, KHR_materials_transmission); the message names it",
    "unsafe_reference": "the file references a file outside its folder (../, absolute path, URL)",
    "too_many_faces": "more triangles than DataConfig.max_faces",
    "degenerate": "zero extent or zero surface area",
    "ambiguous_scene": "a part many times the size of the rest of the scene surrounds it facing outward: "
                       "a skybox or a container, which the loader cannot tell apart; the message names it",
    "watertight_failed": "the watertight conversion produced no closed surface",
    "duplicate": "another input of the run has the same content and name (same uid), "
                 "or the manifest lists the same file twice",
    "internal_error": "an unexpected exception (a bug): see the message",
}


class MeshError(Exception):
    """A mesh that cannot become a dataset row, with a machine-readable reason."""

    def __init__(self, reason_code: str, message: str):
        if reason_code not in REASONS:
            raise ValueError(f"unknown MeshError reason {reason_code!r}")
        super().__init__(f"{reason_code}: {message}")
        self.reason_code = reason_code
        self.message = message
