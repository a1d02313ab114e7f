"""MLflow model registry: releases, the evaluation gate, and alias-based promotion.

A *release* is the models that belong together: VAE, the frozen image encoder both
MAR stages were trained on (``cond``, stored once), MAR-LR and MAR-HR. Each component is
its own registered model (``<name>-vae``, ``<name>-cond``, ``<name>-lr``, ``<name>-hr``);
the release itself is a version of the registered model ``<name>`` whose tags pin the
exact component versions and whose artifact folder holds a ``release.json`` with the same
content. That folder is also an MLflow pyfunc model (:mod:`mar3d.serving`) with copies of
the component folders, so ``mlflow models predict/serve -m models:/<name>@champion`` run
the promoted release.

Consumers resolve *only* through the release (``models:/mar3d@champion``) and then load
the pinned component versions, never the components' own aliases. Promotion moves the
component aliases first (informational) and the release alias last, in one registry
call, so an interrupted promotion leaves consumers on the previous, consistent release.

Weights are plain run artifacts (safetensors + config.yaml), registered by source URI:
no pickled Python objects are ever written to or loaded from the registry.
"""
from __future__ import annotations

import dataclasses
import getpass
import json
import logging
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mar3d import lineage, tracking
from mar3d.gate import GateConfig, GateDecision, evaluate_gate
from mar3d.tracking import log_metrics, log_params, tracked_run
from mar3d.uris import MODELS_URI as _MODELS_URI, NAME as _NAME, RUNS_URI as _RUNS_URI, validate_model_uri

log = logging.getLogger(__name__)

COMPONENTS = ("vae", "cond", "lr", "hr")
PROMOTION_EXPERIMENT = "mar3d-promotions"


class RegistryError(RuntimeError):
    """The registry does not hold what was asked for, or refuses a change."""


@dataclass
class RegistryConfig:
    name: str = "mar3d"
    candidate_alias: str = "candidate"
    champion_alias: str = "champion"

    def validate(self) -> None:
        for value, what in [(self.name, "name"), (self.candidate_alias, "candidate_alias"),
                            (self.champion_alias, "champion_alias")]:
            if not re.fullmatch(_NAME, value):
                raise ValueError(f"registry {what} {value!r} is not a valid model/alias name")
        if self.candidate_alias == self.champion_alias:
            raise ValueError("candidate_alias and champion_alias must differ")

    def component_name(self, component: str) -> str:
        if component not in COMPONENTS:
            raise ValueError(f"unknown component {component!r}; expected one of {COMPONENTS}")
        return f"{self.name}-{component}"


@dataclass
class PromoteConfig:
    """What `mar3d promote` reads from --config / --set (registry names + gate rules)."""
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    reason: str = ""


@dataclass
class Release:
    name: str
    version: str
    components: dict[str, tuple[str, str]]  # component -> (registered model name, version)
    metrics: dict[str, float]
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def _tracking_uri(tracking_uri: str | None) -> str:
    """``tracking_uri``, or MLflow's own default (``MLFLOW_TRACKING_URI``) when None; one
    explicit URI for every client and download of a call (no process-wide MLflow state)."""
    import mlflow

    return tracking_uri or mlflow.get_tracking_uri()


def _download(artifact_uri: str, tracking_uri: str | None, dst: str | Path | None = None) -> Path:
    """A run or registry artifact (``runs:/...``, ``models:/NAME/VERSION``,
    ``models:/NAME@ALIAS``) as a local path."""
    import mlflow

    from mar3d.storage import configure_mlflow_s3

    configure_mlflow_s3()  # artifacts on S3 are fetched by this process's boto3
    uri = _tracking_uri(tracking_uri)
    m = _MODELS_URI.match(artifact_uri)
    if m:
        # MLflow resolves models:/ URIs with its process-wide registry URI whatever URI a
        # download is given; resolved here with this call's client instead.
        client = tracking.client(uri)
        version = m["version"] or client.get_model_version_by_alias(m["name"], m["alias"]).version
        artifact_uri = client.get_model_version_download_uri(m["name"], version)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri,
                                                    dst_path=None if dst is None else str(dst),
                                                    tracking_uri=uri, registry_uri=uri))


def _release_from_version(mv) -> Release:
    tags = dict(mv.tags or {})
    components = {}
    for comp in COMPONENTS:
        ref = tags.get(f"component.{comp}")
        if ref:
            name, _, version = ref.rpartition("/")
            components[comp] = (name, version)
    if "vae" not in components or "lr" not in components:
        raise RegistryError(f"model version {mv.name}/{mv.version} is not a mar3d release "
                            "(missing component.vae / component.lr tags)")
    metrics = {k[len("metric."):]: float(v) for k, v in tags.items() if k.startswith("metric.")}
    return Release(mv.name, str(mv.version), components, metrics, tags)


def register_release(component_uris: dict[str, str], *, cfg: RegistryConfig | None = None,
                     alias: str | None = None, description: str = "",
                     tracking_uri: str | None = None) -> Release:
    """Register VAE/cond/LR(/HR) model artifacts as component versions plus one release version.

    ``component_uris`` maps "vae", "lr" and optionally "hr" to ``runs:/RUN_ID/model`` URIs
    (artifact folders with safetensors + config). "cond", the image encoder, defaults to
    the one MAR-LR records it was trained with (MAR-HR must record the same). Sets ``alias`` (default: the
    candidate alias) on the new release version.
    """
    cfg = cfg or RegistryConfig()
    cfg.validate()
    missing = {"vae", "lr"} - set(component_uris)
    if missing:
        raise ValueError(f"a release needs at least vae and lr models; missing {sorted(missing)}")
    unknown = set(component_uris) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown release components {sorted(unknown)}")
    client = tracking.client(tracking_uri)
    derived = "cond" not in component_uris
    if derived:
        conditioner = trained_conditioner({c: u for c, u in component_uris.items() if c in ("lr", "hr")},
                                          lambda uri: read_model_config(uri, tracking_uri))
        component_uris = {**component_uris, "cond": conditioner}
    pinned: dict[str, tuple[str, str]] = {}
    for comp, uri in component_uris.items():
        m = _RUNS_URI.match(validate_model_uri(uri))
        if not m:
            recorded = " (the image encoder MAR-LR records; log it to a run and pass it as cond)" \
                if comp == "cond" and derived else ""
            raise ValueError(f"component {comp}: expected runs:/RUN_ID/PATH, got {uri!r}{recorded}")
        name = cfg.component_name(comp)
        _ensure_registered_model(client, name)
        # The version names the logged model its training run produced (when ``uri`` is that
        # model: a conditioner logged beside MAR-LR's model is not). A tag, not MLflow's
        # model_id: that one requires the version's files to be the logged model's, and the
        # weights stay the run's artifacts (one copy).
        model_id = lineage.produced_model_id(client, m["run_id"], uri)
        mv = client.create_model_version(name, uri, run_id=m["run_id"], tags={
            "mar3d.component": comp, **({lineage.MODEL_ID_TAG: model_id} if model_id else {})})
        pinned[comp] = (name, str(mv.version))

    release_doc = {"name": cfg.name, "components": {c: {"name": n, "version": v, "source": component_uris[c]}
                                                    for c, (n, v) in pinned.items()}}
    with tracked_run(_tracking_uri(tracking_uri), PROMOTION_EXPERIMENT, f"release-{cfg.name}",
                     tags={"mar3d.kind": "release"}) as run:
        log_release_model(client, run.run_id, component_uris, release_doc, tracking_uri)
    _ensure_registered_model(client, cfg.name)
    tags = {f"component.{c}": f"{n}/{v}" for c, (n, v) in pinned.items()}
    mv = client.create_model_version(cfg.name, f"runs:/{run.run_id}/release",
                                     run_id=run.run_id, tags=tags, description=description)
    client.set_registered_model_alias(cfg.name, alias or cfg.candidate_alias, mv.version)
    log.info("registered release %s/%s: %s", cfg.name, mv.version, tags)
    return _release_from_version(client.get_model_version(cfg.name, mv.version))


def log_release_model(client, run_id: str, component_uris: dict[str, str], release_doc: dict,
                      tracking_uri: str | None) -> None:
    """The release's artifact folder ``release/`` of run ``run_id``: an MLflow pyfunc model
    (:mod:`mar3d.serving`) carrying copies of the component folders, and ``release.json``."""
    from mar3d.serving import save_release_model

    with tempfile.TemporaryDirectory(prefix="mar3d-release-") as tmp:
        dirs = {}
        for comp, uri in component_uris.items():  # each as artifacts/<component> in the model
            dirs[comp] = Path(tmp, "components", comp)
            shutil.move(_download(uri, tracking_uri, Path(tmp, "downloads", comp)), dirs[comp])
        folder = save_release_model(Path(tmp, "release"), dirs, release_doc)
        client.log_artifacts(run_id, str(folder), "release")


def read_model_config(uri: str, tracking_uri: str | None = None) -> dict:
    """config.yaml of a model folder or model URI, as plain data, without its weights:
    of a ``runs:/`` URI only that file is fetched."""
    import yaml

    from mar3d.weights import CONFIG_FILE

    if uri.startswith("runs:"):
        folder = _download(f"{uri.rstrip('/')}/{CONFIG_FILE}", tracking_uri).parent
    else:
        folder = resolve_model_dir(uri, tracking_uri)
    return yaml.safe_load((folder / CONFIG_FILE).read_text())


def trained_conditioner(stage_uris: dict[str, str], read_config) -> str:
    """The conditioner URI the MAR models (``{"lr": uri, "hr": uri}``) were trained with,
    from their config.yaml (``read_config(uri) -> dict``). Stages trained on different
    encoders (by content, ``conditioner_id``), or recording none, cannot form a release."""
    extras = {stage: read_config(uri).get("extra") or {} for stage, uri in stage_uris.items()}
    ids = {stage: extra.get("conditioner_id") for stage, extra in extras.items()}
    unrecorded = sorted(stage for stage, i in ids.items() if not i)
    if unrecorded:
        raise RegistryError(f"MAR-{'/'.join(s.upper() for s in unrecorded)} "
                            f"{', '.join(stage_uris[s] for s in unrecorded)} records no conditioner_id: "
                            "not a model folder written by mar3d's training")
    if len(set(ids.values())) > 1:
        raise RegistryError("MAR-LR and MAR-HR were trained with different image encoders "
                            f"({ids}); train MAR-HR with condition_model_uri set to MAR-LR's")
    stage = "lr" if "lr" in ids else next(iter(ids))
    uri = extras[stage].get("condition_model_uri")
    if not uri:
        raise RegistryError(f"MAR-{stage.upper()} {stage_uris[stage]} records no condition_model_uri")
    return uri


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)


def get_release(uri: str, tracking_uri: str | None = None) -> Release:
    """Resolve ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` to a Release."""
    from mlflow.exceptions import MlflowException

    m = _MODELS_URI.match(validate_model_uri(uri))
    if not m:
        raise ValueError(f"a release URI must be models:/NAME@ALIAS or models:/NAME/VERSION, got {uri!r}")
    client = tracking.client(tracking_uri)
    try:
        if m["alias"]:
            mv = client.get_model_version_by_alias(m["name"], m["alias"])
        else:
            mv = client.get_model_version(m["name"], m["version"])
    except MlflowException as e:
        raise RegistryError(f"{uri}: not found in the registry ({e.message})") from e
    return _release_from_version(mv)


def component_model_ids(release: Release | None, tracking_uri: str | None = None) -> list[str]:
    """The MLflow logged models of a release's components (their training runs' outputs;
    none for components registered before lineage or not trained by mar3d)."""
    if release is None:
        return []
    client = tracking.client(tracking_uri)
    versions = [client.get_model_version(name, version) for name, version in release.components.values()]
    return [mv.tags[lineage.MODEL_ID_TAG] for mv in versions if lineage.MODEL_ID_TAG in (mv.tags or {})]


def find_release(name: str, alias: str, tracking_uri: str | None = None) -> Release | None:
    try:
        return get_release(f"models:/{name}@{alias}", tracking_uri)
    except RegistryError:
        return None


def record_metrics(release: Release, metrics: dict[str, float], eval_run_id: str | None = None,
                   tracking_uri: str | None = None, tags: dict[str, str] | None = None) -> Release:
    """Attach evaluation results to a release version (the gate reads them from here):
    ``metric.<name>`` tags, plus ``tags`` as given (an evaluation's protocol fingerprints
    ``eval.<group>.protocol`` and the champion it scored, ``eval.<group>.champion``)."""
    client = tracking.client(tracking_uri)
    for k, v in metrics.items():
        client.set_model_version_tag(release.name, release.version, f"metric.{k}", repr(float(v)))
    for k, v in (tags or {}).items():
        client.set_model_version_tag(release.name, release.version, k, str(v))
    if eval_run_id:
        client.set_model_version_tag(release.name, release.version, "eval_run_id", eval_run_id)
    return get_release(release.uri, tracking_uri)


def comparable_champion_metrics(candidate: Release, champion: Release,
                                gate: GateConfig) -> tuple[dict[str, float] | None, str]:
    """The champion's metrics on the candidate's objects, and where they come from; None
    (with the reason) when no comparable numbers exist (see :class:`GateConfig`)."""
    group = gate.group
    if not group:
        return champion.metrics, "the champion's own evaluation (no group: not checked for same objects)"
    if candidate.tags.get(f"eval.{group}.champion") == champion.uri:
        prefix = f"{group}/champion/"
        return ({f"{group}/{k[len(prefix):]}": v for k, v in candidate.metrics.items()
                 if k.startswith(prefix)}, f"{champion.uri} scored in the candidate's evaluation")
    mine, theirs = (r.tags.get(f"eval.{group}.protocol") for r in (candidate, champion))
    if mine and mine == theirs:
        return champion.metrics, f"{champion.uri}'s own evaluation (same objects and protocol {mine})"
    return None, (f"{champion.uri} was not scored on the candidate's {group} objects (protocol "
                  f"{mine or 'unknown'} vs {theirs or 'unknown'}): re-run `mar3d evaluate` with "
                  f"--compare-to {champion.uri}")


def download_release(release: Release, dest: str | Path | None = None,
                     tracking_uri: str | None = None) -> dict[str, Path]:
    """Download the pinned component artifact folders; returns component -> local dir."""
    root = Path(dest) if dest else Path(tempfile.mkdtemp(prefix="mar3d-release-"))
    out = {}
    for comp, (name, version) in release.components.items():
        target = root / comp
        target.mkdir(parents=True, exist_ok=True)
        out[comp] = _download(f"models:/{name}/{version}", tracking_uri, target)
    return out


def promote(candidate_uri: str, *, gate: GateConfig | None = None, cfg: RegistryConfig | None = None,
            reason: str = "", tracking_uri: str | None = None) -> GateDecision:
    """Move the champion alias to the candidate release if it passes the gate
    (:func:`evaluate_gate`: better than the mean-shape baseline its evaluation recorded,
    also when there is no champion yet, and no worse than the champion).

    Every decision, promoted or refused, is logged as a run in the
    ``mar3d-promotions`` experiment with who/what/why. A refusal raises nothing;
    callers inspect ``decision.passed`` (the CLI turns it into exit status 1).

    Order makes an interrupted promotion safe: the component aliases move first and the
    release alias -- the one consumers resolve -- last, so until that single call the
    champion is the previous release. An exception in between puts the component
    aliases back; a killed process cannot, so every promotion first re-points the
    component aliases at the current champion release (:func:`reconcile_component_aliases`).
    """
    gate = gate or GateConfig()
    gate.validate()
    cfg = cfg or RegistryConfig()
    cfg.validate()
    candidate = get_release(candidate_uri, tracking_uri)
    champion = find_release(candidate.name, cfg.champion_alias, tracking_uri)
    client = tracking.client(tracking_uri)
    _align_component_aliases(client, candidate.name, champion, cfg.champion_alias, best_effort=False)
    if champion is not None and champion.version == candidate.version:
        raise RegistryError(f"{candidate.uri} already holds alias {cfg.champion_alias!r}")
    if not candidate.metrics:
        raise RegistryError(f"{candidate.uri} has no evaluation metrics; run `mar3d evaluate` first")
    champion_metrics, source = (comparable_champion_metrics(candidate, champion, gate)
                                if champion else (None, "no champion yet"))
    decision = evaluate_gate(candidate.metrics, champion_metrics, gate,
                             champion_missing=source if champion and champion_metrics is None else None)

    tags = {
        "mar3d.kind": "promotion",
        "decision": "promoting" if decision.passed else "refused",
        "actor": f"{getpass.getuser()}@{socket.gethostname()}",
        "reason": reason or "-",
        "candidate": candidate.uri,
        "champion_before": champion.uri if champion else "none",
        "gate_group": gate.group or "-",
        "champion_metrics_source": source,
    }
    with tracked_run(_tracking_uri(tracking_uri), PROMOTION_EXPERIMENT,
                     f"promote-{candidate.name}-v{candidate.version}", tags=tags) as run:
        log_params(run.tracking_uri, run.run_id, {
            "rel_tolerance": gate.rel_tolerance, "beat_baseline": gate.beat_baseline,
            "gate_metrics": json.dumps(gate.metrics, sort_keys=True)})
        metrics = {f"candidate.{k}": v for k, v in candidate.metrics.items()}
        metrics.update({f"champion.{k}": v for k, v in (champion_metrics or {}).items()})
        log_metrics(run.tracking_uri, run.run_id, metrics)
        client.log_text(run.run_id, decision.table(), "gate.md")
        client.log_dict(run.run_id, {"passed": decision.passed,
                                     "checks": [dataclasses.asdict(c) for c in decision.checks]}, "gate.json")
        if decision.passed:
            try:
                for comp, (name, version) in candidate.components.items():
                    client.set_registered_model_alias(name, cfg.champion_alias, version)
                client.set_registered_model_alias(candidate.name, cfg.champion_alias, candidate.version)
            except BaseException:
                client.set_tag(run.run_id, "decision", "interrupted")
                _align_component_aliases(client, candidate.name, champion, cfg.champion_alias,
                                         best_effort=True)
                raise
            if champion:
                client.set_registered_model_alias(candidate.name, "previous", champion.version)
            client.set_tag(run.run_id, "decision", "promoted")
            log.info("promoted %s to %s", candidate.uri, cfg.champion_alias)
        else:
            log.warning("refused to promote %s:\n%s", candidate.uri, decision.table())
    return decision


def reconcile_component_aliases(name: str, cfg: RegistryConfig | None = None,
                                tracking_uri: str | None = None) -> list[str]:
    """Make the component models' champion aliases agree with the champion release
    ``name`` (repairs a promotion killed between its alias moves); returns the component
    models whose alias changed. :func:`promote` does this first, every time."""
    cfg = cfg or RegistryConfig()
    champion = find_release(name, cfg.champion_alias, tracking_uri)
    return _align_component_aliases(tracking.client(tracking_uri), name, champion, cfg.champion_alias,
                                    best_effort=False)


def _align_component_aliases(client, release_name: str, champion: Release | None, alias: str,
                             best_effort: bool) -> list[str]:
    """Point each component model's ``alias`` at the version ``champion`` pins for it, or
    remove it where the champion pins none (no champion yet). ``best_effort`` (used while
    another error is being raised) logs a failing component and goes on to the next."""
    from mlflow.exceptions import MlflowException

    moved = []
    for comp in COMPONENTS:
        pinned = champion.components.get(comp) if champion else None
        model, want = pinned or (RegistryConfig(name=release_name).component_name(comp), None)
        try:
            try:
                current = client.get_model_version_by_alias(model, alias).version
            except MlflowException:
                current = None  # no such alias, or no such component model
            if (current is None and want is None) or str(current) == str(want):
                continue
            if want is None:
                client.delete_registered_model_alias(model, alias)
            else:
                client.set_registered_model_alias(model, alias, want)
            moved.append(model)
        except Exception as e:
            if not best_effort:
                raise
            log.error("could not restore alias %s on %s: %s", alias, model, e)
    if moved:
        log.warning("alias %r of %s now agrees with champion release %s (a promotion was interrupted)",
                    alias, ", ".join(moved), champion.uri if champion else f"{release_name}: none")
    return moved


def read_eval_report(path: str | Path) -> dict[str, float]:
    """The aggregated metrics of a `mar3d evaluate` report.json."""
    return read_eval_report_and_run(path)[0]


def read_eval_report_and_run(path: str | Path) -> tuple[dict[str, float], str | None]:
    """The aggregated metrics of a `mar3d evaluate` report.json and the MLflow run of the
    evaluation that wrote it (None if it names none)."""
    from mar3d import storage

    if storage.is_dir(path):
        path = storage.join(path, "report.json")
    if not storage.is_file(path):
        raise FileNotFoundError(f"evaluation report {path} does not exist")
    doc = json.loads(storage.read_bytes(path))
    metrics = doc.get("metrics") if isinstance(doc, dict) else None
    if not isinstance(metrics, dict) or not metrics:
        raise ValueError(f"{path}: no 'metrics' mapping in the evaluation report")
    run_id = doc.get("run_id")
    return ({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
            run_id if isinstance(run_id, str) and run_id else None)


def resolve_model_dir(uri: str, tracking_uri: str | None = None, dst: str | Path | None = None) -> Path:
    """A local folder for ``uri``: an existing directory, or an MLflow
    ``runs:/RUN_ID/PATH`` / ``models:/NAME/VERSION`` / ``models:/NAME@ALIAS`` URI that is
    downloaded (to ``dst`` or a temporary folder)."""
    if not uri:
        raise ValueError("model URI is empty")
    path = Path(uri)
    if "://" not in uri and not uri.startswith(("runs:", "models:")):
        if not path.is_dir():
            raise FileNotFoundError(f"model folder {uri} does not exist")
        return path
    # Only registry and run URIs of a known shape: never file://, http(s)://, s3://, ...
    uri = validate_model_uri(uri)
    return _download(uri, tracking_uri, dst)
