"""Sharp-edge sampling measured: does DataConfig.sharp_edge_fraction help the Pyramid VAE?

Dora (Chen et al. 2024) draws half of the encoder's input points from the sharp edges of
the mesh (its sharp_sample.py: ``point_number // 2`` salient points). Here, with the
protocol and helpers of ``benchmarks/vae_ablation.py``, for each fraction f in
``--fractions`` the SAME edge-rich YCB objects (boxes, tools) are prepared with
``sharp_edge_fraction=f`` (sharp edges of the ORIGINAL mesh, dihedral > 30 degrees, on
the watertight "snap" surface), and one pyramid VAE per fraction is trained through the
real training path (``train_or_reuse``: Ray Train + DeepSpeed, MLflow) with the same
config, seed, steps and HR tokens: only the data differs. Then every object is
reconstructed by every model:

* encoder input: the object's surface pyramid from that model's OWN dataset (sharp
  sampling is part of the input distribution), the same subset seeds for every model;
  posterior mean, HR tokens, hierarchical extraction (``reconstruct_shape``);
* ground truth: the ORIGINAL mesh (``mar3d.data.mesh_io.load_mesh``, normalized like the
  shard; the frame is checked against the row's stored transform), not the shard's
  ``surface_0`` (which holds the sharp samples when f > 0);
* CD / F-score (tau 0.05) / NC: ``mar3d.metrics.mesh_metrics`` with ``--metric-points``,
  ``normalize=False`` (both meshes are in the shard frame already);
* edge CD / edge NC: ``mar3d.metrics.edge_metrics`` on ``--edge-points`` samples of each
  surface. The band is the GT points within ``--edge-distance`` of the original's sharp
  edges (``mar3d.data.sampling.sharp_edges``, the data config's 30 degrees) and the
  reconstruction points whose nearest GT point is in that band. Edge CD = mean of
  (GT band -> reconstruction) and (reconstruction band -> GT) nearest distances; edge NC
  = mean |cos| of nearest-neighbour normals over the same two sets. An object whose
  band is empty on one side gets NaN: left out of the mean, never counted as better;
* vol IoU / near IoU: decoder logits against the stored labels of the watertight mesh.
  Points and labels are read from the first fraction's dataset for every model (labels
  do not depend on the fraction; the same points keep the comparison paired).

Printed per split (training objects / held-out objects, ``--hold-out``): per fraction
mean +- std over objects, the ratio of the means vs the first fraction (the baseline)
and on how many objects each fraction is strictly better (paired). MLflow: a SQLite
store in the workdir unless ``--mlflow-uri``; the means go into each training run.
Runs and datasets are named after a hash of what defines them, so the same command
again reuses the trained models.

Examples:
  python benchmarks/sharp_edges.py                        # 0 vs 0.5, default objects
  python benchmarks/sharp_edges.py --fractions 0 0.25 0.5 --steps 600 --workdir /tmp/sharp
  python benchmarks/sharp_edges.py --objects 003_cracker_box 048_hammer --hold-out 062_dice
"""
from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_fidelity import original_mesh  # noqa: E402
from vae_ablation import (METRICS, REPO, SPLIT_TITLES, benchmark_parser, check_args,  # noqa: E402
                          input_pyramid, input_sizes, log_to_mlflow, prepare, reconstruct_shape,
                          report_text, run_record, small_data_config, start_runtime, summarize,
                          table, train_config, train_or_reuse, training_summary, write_report,
                          ycb_objects)

EDGE_RICH = ("003_cracker_box", "004_sugar_box", "008_pudding_box", "009_gelatin_box",
             "036_wood_block", "061_foam_brick", "077_rubiks_cube", "035_power_drill",
             "037_scissors", "048_hammer", "042_adjustable_wrench", "044_flat_screwdriver")
EDGE_RICH_HELD_OUT = ("010_potted_meat_can", "070-a_colored_wood_blocks", "062_dice")
SHARP_METRICS = {
    **{k: METRICS[k] for k in ("chamfer", "f_score", "normal_consistency")},
    "edge_chamfer": ("edge CD", False),
    "edge_nc": ("edge NC", True),
    **{k: METRICS[k] for k in ("vol_iou", "near_iou")},
}


def arm(fraction: float) -> str:
    return f"sharp {fraction:g}"


@dataclass
class Original:
    """The ground truth of one object: its original mesh in the shard frame, surface
    samples for the edge metrics and its sharp edges."""
    mesh: object
    points: np.ndarray
    normals: np.ndarray
    segments: np.ndarray


def sources(dataset) -> dict[str, dict]:
    """uid -> the row's ``source_path`` and ``transform`` (columns ``read_row`` leaves out)."""
    import pyarrow.parquet as pq

    from mar3d.data.schema import table_row

    out = {}
    for path in dict.fromkeys(path for path, _ in dataset.index):
        shard = pq.read_table(path, columns=["uid", "source_path", "transform"])
        out.update((r["uid"], r) for r in (table_row(shard, i) for i in range(shard.num_rows)))
    return out


def load_original(source: dict, angle_deg: float, num_points: int, seed: int) -> Original:
    from mar3d.data.sampling import sharp_edges
    from mar3d.metrics import sample_surface

    loaded, mesh, _ = original_mesh(Path(source["source_path"]))
    if not np.allclose(loaded.transform, source["transform"], atol=1e-5):
        raise RuntimeError(f"{source['uid']}: the reloaded mesh is not in the shard's frame")
    points, normals = sample_surface(mesh, num_points, seed=seed)
    segments, _ = sharp_edges(loaded.vertices, loaded.faces, angle_deg)
    return Original(mesh, points, normals, segments)


def surface_scores(mesh, gt: Original, args) -> dict:
    """CD / F / NC of the whole surface and the edge metrics, against the original."""
    from mar3d.metrics import edge_metrics, mesh_metrics, sample_surface

    scores = mesh_metrics(mesh, gt.mesh, num_points=args.metric_points, normalize=False, seed=args.seed)
    points, normals = (sample_surface(mesh, args.edge_points, seed=args.seed) if len(mesh.faces)
                       else (np.zeros((0, 3)), np.zeros((0, 3))))
    return {**{k: scores[k] for k in ("chamfer", "f_score", "normal_consistency")},
            **edge_metrics(points, normals, gt.points, gt.normals, gt.segments, args.edge_distance)}


def reconstruct(models: dict, datasets: dict, sizes: tuple[int, ...], args, split: str) -> list[dict]:
    """Per object and fraction: each model encodes its own dataset's row of the object and
    is scored against the original mesh (and the baseline dataset's occupancy labels)."""
    from mar3d.data.dataset import ShapeDataset

    readers = {a: ShapeDataset(root, num_occ=16, seed=0) for a, root in datasets.items()}
    base = readers[next(iter(readers))]  # the first fraction: occupancy points and labels
    origins = sources(base)
    angle = small_data_config(args.num_workers).sharp_edge_angle_deg
    rows = []
    for i, uid in enumerate(base.uids):
        labels = base.read_row(i)
        gt = load_original(origins[uid], angle, args.edge_points, args.seed)
        record = {"uid": uid, "split": split, "edge_length": float(
            np.linalg.norm(gt.segments[:, 1] - gt.segments[:, 0], axis=1).sum())}
        for a, vae in models.items():
            row = readers[a].read_row(readers[a].uids.index(uid))
            mesh, record[a] = reconstruct_shape(vae, input_pyramid(row, sizes, args.seed + i),
                                                labels, args.resolution)
            record[a].update(surface_scores(mesh, gt, args))
        band = record[next(iter(models))]["edge_gt_points"]
        print(f"[eval] {split} {uid} (sharp edges {record['edge_length']:.1f} long, "
              f"{band} GT band points): " + "  ".join(
                  f"{a}: CD {record[a]['chamfer']:.4f} edge CD {record[a]['edge_chamfer']:.4f} "
                  f"edge NC {record[a]['edge_nc']:.3f} IoU {record[a]['vol_iou']:.3f}" for a in models),
              flush=True)
        rows.append(record)
    return rows


def undefined_note(rows: list[dict], arms: tuple[str, ...]) -> str:
    counts = {a: sum(not np.isfinite(r[a]["edge_chamfer"]) for r in rows) for a in arms}
    if not any(counts.values()):
        return ""
    return ("\n\nEdge metrics undefined (empty band on one side), left out of the means: "
            + ", ".join(f"{a} {n}" for a, n in counts.items()) + ".")


def parse_args(argv=None):
    p = benchmark_parser(__doc__, REPO / "outputs" / "sharp_edges", "sharp-edges", steps=800)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.5],
                   help="sharp_edge_fraction of each arm; the first is the baseline of the ratios "
                        "and paired counts (default: 0 and Dora's 0.5)")
    p.add_argument("--objects", nargs="+", default=list(EDGE_RICH),
                   help="YCB objects to train on and reconstruct (default: boxes and tools)")
    p.add_argument("--hold-out", nargs="*", default=list(EDGE_RICH_HELD_OUT),
                   help="YCB objects only reconstructed (none: give the flag without names)")
    p.add_argument("--edge-distance", type=float, default=0.03,
                   help="half-width of the band around sharp edges, normalized units (longest side 2)")
    p.add_argument("--edge-points", type=int, default=65536,
                   help="points sampled on each surface for the edge metrics")
    args = p.parse_args(argv)
    check_args(p, args, ("edge_points",))
    if not all(0.0 <= f < 1.0 for f in args.fractions) or len(set(args.fractions)) != len(args.fractions):
        p.error("--fractions must be distinct values in [0, 1)")
    if not args.edge_distance > 0:
        p.error("--edge-distance must be > 0")
    try:
        known = set(ycb_objects(args.ycb))
    except FileNotFoundError as e:
        p.error(str(e))
    missing = sorted(set(args.objects + args.hold_out) - known)
    if missing:
        p.error(f"not in {args.ycb}: {' '.join(missing)}")
    if set(args.objects) & set(args.hold_out):
        p.error("an object is both trained on and held out")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    tracking_uri = start_runtime(args)
    import torch

    from mar3d.inference import load_vae

    arms = tuple(arm(f) for f in args.fractions)
    data, held = {}, {}
    for f, a in zip(args.fractions, arms):
        data[a] = prepare(args.ycb, args.objects, args.workdir, "train", args.num_workers, f)
        if args.hold_out:
            held[a] = prepare(args.ycb, args.hold_out, args.workdir, "heldout", args.num_workers, f)
    prepared_s = time.perf_counter() - started

    cfgs = {a: train_config(args, "pyramid", data[a], held.get(a), tracking_uri, prefix=f"sharp{f:g}")
            for f, a in zip(args.fractions, arms)}
    trained = {a: train_or_reuse(cfg) for a, cfg in cfgs.items()}
    cfg = cfgs[arms[0]]
    sizes = input_sizes(cfg, data[arms[0]])

    torch.manual_seed(args.seed)
    models = {a: load_vae(m.model_dir)[0] for a, m in trained.items()}
    eval_started = time.perf_counter()
    rows = {"train": reconstruct(models, data, sizes, args, "train")}
    if held:
        rows["heldout"] = reconstruct(models, held, sizes, args, "heldout")
    eval_s = time.perf_counter() - eval_started

    summaries = {split: summarize(r, arms, arms[0], SHARP_METRICS) for split, r in rows.items()}
    header = (f"Sharp-edge sampling, pyramid VAE with {args.tokens} HR tokens per fraction: "
              f"{training_summary(cfg, args, sizes)}; GT: the original meshes; CD/F(tau=0.05)/NC "
              f"on {args.metric_points} points, edge CD/NC within {args.edge_distance} of sharp "
              f"edges (dihedral > {small_data_config(1).sharp_edge_angle_deg:g} deg) on "
              f"{args.edge_points} points, IoUs from decoder logits.")
    tables = [table(s, SPLIT_TITLES[split].replace("shapes", "objects"), arms, SHARP_METRICS)
              + undefined_note(rows[split], arms) for split, s in summaries.items()]
    timing = {"prepare_s": prepared_s, "eval_s": eval_s, "total_s": time.perf_counter() - started,
              **{f"train_{a.replace(' ', '')}_s": m.seconds for a, m in trained.items()}}
    text = report_text(header, tables, timing)
    key = hashlib.sha256(" ".join(c.run_name for c in cfgs.values()).encode()).hexdigest()[:10]
    results = {"data": {a: str(d) for a, d in data.items()}, "heldout_data": {a: str(d) for a, d in held.items()},
               "surface_sizes": list(sizes), "tracking_uri": tracking_uri,
               "runs": {a: run_record(m) for a, m in trained.items()},
               "summary": summaries, "per_shape": rows, "timing": timing}
    report = write_report(args, f"sharp_edges-T{args.tokens}-seed{args.seed}-{key}", text, results)
    log_to_mlflow(tracking_uri, trained, summaries, report, SHARP_METRICS, "sharp_edges")
    return results


if __name__ == "__main__":
    main()
