"""Evaluation of generated shapes on held-out views and held-out objects, logged to MLflow.

    result = evaluate("models:/mar3d@candidate", "data/ycb", "out/eval", EvalConfig())

The prepared dataset carries its own split (:mod:`mar3d.data.splits`): training objects
(each with one rendered view training never saw) and validation objects training never
saw at all. Evaluation scores **groups** of objects, each reported on its own:

* ``seen_view`` -- training objects, conditioned on their held-out view: does the model
  recognise an object it learned from a view it was not shown? With
  ``distinct_families`` one object per shape family (YCB's ``065-a`` .. ``065-j`` cups
  are one family), so the group is not a set of near-duplicates.
* ``heldout_objects`` -- validation objects (same view): does it generalise?
* ``synth_heldout`` -- validation objects of the procedural corpus (rows with source
  ``mar3d-synth``, :mod:`mar3d.data.synth`): new instances of the categories training
  learned from. In a dataset that mixes the corpus with other objects (scans), the two
  groups above take only the other objects, so each collection is scored on its own.
* ``all_objects`` -- every object of the dataset (for a dataset that is held out as a
  whole, e.g. another collection).

Objects are taken in the split's stable hash order, at most ``max_objects`` per group.

For every object the condition image goes through
:class:`~mar3d.inference.MAR3DPipeline` and the generated mesh is scored against the
stored ground truth. Per group, next to the model ("candidate"):

* **Baseline** ``baseline``: a constant "mean shape" prediction, the same for every
  input -- the training object whose surface is nearest (Chamfer) to all other training
  objects on average (the medoid of at most ``baseline_pool`` of them). A model that
  ignores its input and outputs one shape cannot beat the best constant shape by much,
  so this is the line a model must clear to show that it uses its image.
* **Condition following**: the Chamfer distance of every generated mesh to every ground
  truth of its group. ``retrieval_top1`` = fraction of objects whose own ground truth is
  the nearest (chance 1/N); ``diversity_ratio`` = mean pairwise Chamfer among the
  generated meshes / among their ground truths (0 for a constant output, about 1 when
  outputs differ as much as the objects do).
* **Champion** (``compare_to``): the current champion release, generated and scored on
  the same objects with the same settings, so the promotion gate compares like with like.

Protocol:

* **Frame, no alignment search.** The models are trained in the dataset's canonical
  frame (every mesh centred and scaled into [-1, 1]^3, never rotated to the view), so a
  generated shape lives in the same frame as its ground truth and is compared as is.
  Per-object scores normalize both by the ground truth's bounding box
  (:func:`mar3d.metrics.mesh_metrics`); the cross-object Chamfer matrices use the
  dataset frame itself (already normalized), so that every row compares distances in
  one frame.
* **Ground truth** is the stored ``surface_0`` points and normals (sampled from the
  watertight mesh the VAE learned from); ``num_points`` points are sampled from the
  generated mesh. Chamfer distance (unsquared, mean of both directions), F-score at
  ``fscore_threshold`` and normal consistency follow :mod:`mar3d.metrics`.
* **IoU** on the stored uniform ``vol_points`` / ``vol_labels``: the decoder's occupancy
  of the generated latents (logit > 0). ``vae_iou`` is the same for the VAE's own
  reconstruction of the ground-truth surface: the ceiling the generator can reach.
* **Failures** are results. An object whose generation raises, whose mesh is empty or
  whose metrics are not finite is recorded with ``status="failed"`` and the reason in
  ``error``; it counts 0 in the F-score / normal consistency / IoU / precision / recall
  means and as a retrieval miss, and is left out of the Chamfer mean (reported with
  ``num_scored`` / ``num_failed`` / ``failure_rate``).

Results go to ``output/`` (``report.json``, ``per_object.csv``, ``contact_sheets/<group>.png``,
``previews/*.png``, ``chamfer_<group>.csv``; ``output`` may be an ``s3://`` prefix, see
:func:`mar3d.evaluate.job._evaluate_to_remote`) and to one MLflow run in ``cfg.experiment``:
params (flattened config, model URI, dataset path and content hash), metrics named
``<group>/<metric>``, ``<group>/baseline/<metric>``, ``<group>/champion/<metric>``,
the per-object table and every file above. With ``release_uri`` the metrics are also
attached to that registry release, where the promotion gate reads them.

Modules: :mod:`~mar3d.evaluate.config` (settings, result, output names),
:mod:`~mar3d.evaluate.groups` (objects per group, stored rows, fingerprints),
:mod:`~mar3d.evaluate.scoring` (generation and per-object scores),
:mod:`~mar3d.evaluate.baseline` (the mean shape), :mod:`~mar3d.evaluate.reporting`
(files, previews, contact sheets, the Markdown table), :mod:`~mar3d.evaluate.release`
(a release folder from loose components) and :mod:`~mar3d.evaluate.job` (the run itself);
the condition-following metrics live in :mod:`mar3d.metrics`.
"""
from mar3d.evaluate.baseline import MeanShape, baseline_record, mean_shape
from mar3d.evaluate.config import (FAILED_SCORES, GROUP_DESCRIPTIONS, GROUPS, PREVIEW_DIR, REPORT_FILE, SCORE_KEYS,
                                   SHEET_DIR, TABLE_FILE, EvalConfig, EvalResult)
from mar3d.evaluate.groups import (EvalGroup, EvalRows, dataset_fingerprint, group_pools, protocol_fingerprint,
                                   select_groups)
from mar3d.evaluate.job import evaluate, evaluate_components
from mar3d.evaluate.release import assemble_release_dir
from mar3d.evaluate.reporting import TABLE_METRICS, evaluation_table, write_table
from mar3d.evaluate.scoring import evaluate_object, pipeline_outputs, strided, vae_reconstruction_iou
from mar3d.metrics import (aggregate, category_following, category_hits, cross_chamfer, following_metrics,
                           pairwise_chamfer, per_category)

__all__ = ["EvalConfig", "EvalGroup", "EvalResult", "GROUPS", "aggregate", "assemble_release_dir",
           "cross_chamfer", "pairwise_chamfer", "dataset_fingerprint", "evaluate", "evaluate_components",
           "evaluate_object", "evaluation_table", "pipeline_outputs", "following_metrics", "mean_shape",
           "select_groups",
           # the other public names, so callers keep importing from the package, not its modules
           "FAILED_SCORES", "GROUP_DESCRIPTIONS", "PREVIEW_DIR", "REPORT_FILE", "SCORE_KEYS", "SHEET_DIR",
           "TABLE_FILE", "TABLE_METRICS", "EvalRows", "MeanShape", "baseline_record", "category_following",
           "category_hits", "group_pools", "per_category", "protocol_fingerprint", "strided",
           "vae_reconstruction_iou", "write_table"]
