"""One release folder from separately given VAE / MAR-LR / MAR-HR components, so that
components never registered together are evaluated through the release loading path."""
from __future__ import annotations

from pathlib import Path


def assemble_release_dir(vae_uri: str, lr_uri: str, hr_uri: str | None, dest: str | Path,
                         tracking_uri: str | None = None) -> Path:
    """One release folder (``dest/vae``, ``dest/cond``, ``dest/lr``, ``dest/hr``) from
    separately given components (local folders or ``runs:/`` / ``models:/`` URIs), so that
    evaluating components that were never registered as a release goes through the same
    loading path as a release. The image encoder (``cond``) is the one MAR-LR records it
    was trained with. Remote components are
    downloaded under ``dest/.download``; every component becomes a symlink to its folder
    (nothing is copied)."""
    from mar3d.registry import read_model_config, trained_conditioner

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for component, uri in (("vae", vae_uri), ("lr", lr_uri), ("hr", hr_uri)):
        _link_component(dest, component, uri, tracking_uri)
    stages = {c: str(dest / c) for c in ("lr", "hr") if (dest / c).is_dir()}
    conditioner = trained_conditioner(stages, read_model_config)
    _link_component(dest, "cond", conditioner, tracking_uri)
    return dest


def _link_component(dest: Path, component: str, uri: str | None, tracking_uri: str | None) -> None:
    from mar3d.registry import resolve_model_dir

    link = dest / component
    if link.is_symlink() or link.exists():
        raise FileExistsError(f"{link} already exists; give an empty destination folder")
    if uri is None:
        return
    if Path(uri).is_dir():
        folder = Path(uri)
    else:
        download = dest / ".download" / component
        download.mkdir(parents=True)
        folder = resolve_model_dir(uri, tracking_uri=tracking_uri, dst=download)
    link.symlink_to(Path(folder).resolve(), target_is_directory=True)
