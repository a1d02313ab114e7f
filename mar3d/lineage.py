"""Lineage in MLflow: which data a run read, which model a training run produced.

Every training, evaluation and generation run logs the dataset it read as an MLflow
dataset input (the run page's *Datasets*): its location as source, the content
fingerprint as digest, row counts as profile and the role as the standard
``mlflow.data.context`` tag (``train``, ``eval``, ``generate``). The same content at
the same location is the same MLflow dataset, so runs that read one prepared dataset are
linked through it.

A training run also records the model it produced as an MLflow *logged model* (the
run's *Logged models*): no second copy of the weights -- the logged model's tags point at
the run artifact (``mar3d.model_uri``), which stays the registry's source -- and the
component versions a release registers carry its id (tag :data:`MODEL_ID_TAG`; MLflow's
own ``model_id`` field would require the version's files to be the logged model's), so a
registered version leads back to it and to the run. An evaluation and a generation run
log the release's logged models as their model inputs.
"""
from __future__ import annotations

import json
from typing import Any

from mar3d import storage, tracking

CONTEXT_TAG = "mlflow.data.context"  # MLflow's own tag for a dataset's role in a run
# On a training run: the logged model it produced; on a component version: the same.
MODEL_ID_TAG = "mar3d.logged_model_id"


def dataset_entity(location: str, digest: str, profile: dict[str, Any], name: str | None = None):
    """An MLflow dataset entity for data at ``location`` with content ``digest``."""
    from mlflow.entities import Dataset

    source = location if storage.is_remote(location) else str(storage.display(location))
    # The last two path parts: a prepared dataset's folder is often just "data".
    default_name = "/".join(source.rstrip("/").split("/")[-2:])
    return Dataset(name=name or default_name, digest=digest[:36],
                   source_type="s3" if storage.is_remote(location) else "local",
                   source=json.dumps({"uri": source}), profile=json.dumps(profile, sort_keys=True))


def log_dataset(tracking_uri: str, run_id: str, location: str, digest: str, context: str,
                profile: dict[str, Any], name: str | None = None) -> None:
    """Log the data at ``location`` as the run's dataset input with role ``context``."""
    from mlflow.entities import DatasetInput, InputTag

    entity = dataset_entity(location, digest, {**profile, "digest": digest}, name)
    tracking.client(tracking_uri).log_inputs(
        run_id, datasets=[DatasetInput(entity, tags=[InputTag(CONTEXT_TAG, context)])])


def log_prepared_dataset(tracking_uri: str, run_id: str, root: str, fingerprint: dict[str, Any],
                         context: str, extra: dict[str, Any] | None = None) -> None:
    """A prepared shard dataset as the run's input; ``fingerprint``: its
    ``dataset_fingerprint`` (the hash over its shards' hashes, row and shard counts)."""
    log_dataset(tracking_uri, run_id, root, fingerprint["hash"], context,
                {"rows": fingerprint["rows"], "shards": fingerprint["shards"], **(extra or {})})


def log_produced_model(tracking_uri: str, run_id: str, name: str, model_uri: str,
                       kind: str, params: dict[str, Any] | None = None) -> str:
    """Record the model a training run produced as an MLflow logged model (READY, an output
    of the run), pointing at ``model_uri``; returns its id (also the run's
    :data:`MODEL_ID_TAG`)."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    client = tracking.client(tracking_uri)
    run = client.get_run(run_id)
    model = client.create_logged_model(
        run.info.experiment_id, name=name, source_run_id=run_id, model_type=f"mar3d-{kind}",
        tags={"mar3d.model_uri": model_uri, "mar3d.component": kind},
        params={k: str(v)[:6000] for k, v in (params or {}).items()})
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    client.set_tag(run_id, MODEL_ID_TAG, model.model_id)
    return model.model_id


def produced_model_id(client, run_id: str, model_uri: str | None = None) -> str | None:
    """The logged model a training run recorded (None for runs from before lineage, or
    when ``model_uri`` is given and is not the model the run produced)."""
    tags = client.get_run(run_id).data.tags
    if model_uri is not None and tags.get("mar3d.model_uri") != model_uri:
        return None
    return tags.get(MODEL_ID_TAG)


def produced_model_ids(tracking_uri: str, model_uris: list[str]) -> list[str]:
    """The logged models that the training runs behind ``runs:/RUN/PATH`` model URIs
    produced (components evaluated before any release names them); model folders and
    other URIs name none."""
    from mar3d.uris import RUNS_URI

    client = tracking.client(tracking_uri)
    runs = [(m["run_id"], uri) for uri in model_uris if (m := RUNS_URI.match(uri))]
    return [model_id for run_id, uri in runs if (model_id := produced_model_id(client, run_id, uri))]


def log_model_inputs(tracking_uri: str, run_id: str, model_ids: list[str]) -> None:
    """The logged models a run used (an evaluation's or generation's release components)."""
    from mlflow.entities import LoggedModelInput

    ids = [m for m in dict.fromkeys(model_ids) if m]
    if ids:
        tracking.client(tracking_uri).log_inputs(run_id, models=[LoggedModelInput(m) for m in ids])
