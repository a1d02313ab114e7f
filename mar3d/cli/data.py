"""`mar3d data prepare | synth | cache`."""
from __future__ import annotations

import argparse
from pathlib import Path

from mar3d.cli.common import add_config_args, report_job, write_result
from mar3d.config import load_config


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from mar3d.data.config import DataConfig
    from mar3d.data.prepare import prepare_dataset

    cfg = load_config(DataConfig, args.config, args.overrides)
    if args.num_workers is not None:
        cfg.num_workers = args.num_workers
    apply_selection_flags(cfg, args)
    cfg.validate()
    result = prepare_dataset(args.input, args.output, cfg, progress=not args.no_progress)
    return report_job(args, result, result.num_errors)


def apply_selection_flags(cfg, args: argparse.Namespace) -> None:
    """--categories / --uids / --limit into the DataConfig's select_* fields (where a
    pipeline sets them with --set); the uid file as an absolute path, so the manifest's
    config says which file it was."""
    if args.categories is not None:
        cfg.select_categories = tuple(c.strip() for c in args.categories.split(",") if c.strip())
    if args.uids is not None:
        from mar3d import storage

        cfg.select_uids_file = args.uids if storage.is_remote(args.uids) else str(Path(args.uids).absolute())
    if args.limit is not None:
        cfg.select_limit = args.limit


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from mar3d.data.synth import SynthConfig, synthesize

    cfg = load_config(SynthConfig, args.config, args.overrides)
    for name, value in (("num_objects", args.num), ("seed", args.seed), ("photo_dir", args.photo_dir),
                        ("workers", args.workers)):
        if value is not None:
            setattr(cfg, name, value)
    if args.categories is not None:
        cfg.categories = tuple(c.strip() for c in args.categories.split(",") if c.strip())
    try:
        cfg.validate()
    except ValueError as e:
        raise SystemExit(f"mar3d data synth: {e}") from None
    result = synthesize(args.output, cfg, progress=not args.no_progress)
    print(result.summary())
    write_result(args, {"output": result.output, "num_objects": result.num_objects,
                        "categories": result.categories, "seconds": result.seconds})
    return 0


def _cmd_data_cache(args: argparse.Namespace) -> int:
    from mar3d.train.feature_cache import FeatureCacheConfig, build_feature_cache

    cfg = load_config(FeatureCacheConfig, args.config, args.overrides)
    for name in ("num_subsets", "dtype", "num_workers"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    result = build_feature_cache(args.data, args.output, args.condition_model, args.vae_model, cfg,
                                 tracking_uri=args.tracking_uri, progress=not args.no_progress)
    return report_job(args, result, result.errors)


def add_data_commands(sub: argparse._SubParsersAction) -> None:
    """`mar3d data prepare`, `mar3d data cache`."""
    data = sub.add_parser("data", help="dataset jobs (mesh -> Parquet shards)",
                          description="Dataset jobs.")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    prep = data_sub.add_parser(
        "prepare", help="meshes -> watertight, multi-scale points, occupancy, renders -> Parquet",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the Ray Data preparation job. Every input mesh ends as a row in a "
                    "shard or as a row in OUTPUT/errors.parquet with a reason; re-running on "
                    "the same OUTPUT skips meshes already in complete shards.",
        epilog="Input formats: GLB/GLTF/OBJ(+MTL, textures)/PLY/STL, found recursively in DIR,\n"
               "or listed in a manifest (.json list, .jsonl with a 'path' key, .csv with a\n"
               "'path' column, or .txt one path per line; relative paths resolve against the\n"
               "manifest's folder and may not escape it).\n"
               "Objaverse: an Objaverse 1.0 tree (its folder or its object-paths.json[.gz]; with\n"
               "lvis-annotations.json.gz and metadata/*.json.gz when present), or an Objaverse-XL\n"
               "table (.parquet, or .csv with fileIdentifier, sha256, source, license and\n"
               "local_path, the file relative to the table's folder). Their rows keep source_uid,\n"
               "category, name, license and source; --categories/--uids/--limit select from them:\n"
               "  mar3d data prepare --input ~/.objaverse/hf-objaverse-v1 --output outputs/data \\\n"
               "      --categories chair,table --limit 200\n"
               "Frames: render_up_axis is the dataset's up (y: glTF/Objaverse, z: YCB scans);\n"
               "glTF files (+Y up by specification) are turned into a z-up dataset, other formats\n"
               "are taken as they are. A procedural corpus mixed in (--set synth_objects=N) is\n"
               "made in OUTPUT/corpus once:\n"
               "  mar3d data prepare --input ../shared/datasets/ycb --output outputs/data \\\n"
               "      --config data_local --set synth_objects=1000")
    prep.add_argument("--input", required=True, action="append",
                      help="directory of meshes, a manifest file, an Objaverse tree or an Objaverse-XL "
                           "table; repeat it to make one dataset of several (e.g. scans and a "
                           "`mar3d data synth` corpus: give them the same up axis, see render_up_axis)")
    prep.add_argument("--output", required=True, help="output directory (shards, manifest.json, errors.parquet)")
    prep.add_argument("--num-workers", type=int, default=None,
                      help="parallel Ray tasks (default: config num_workers)")
    prep.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    prep.add_argument("--fail-on-errors", action="store_true",
                      help="exit with status 3 if any input mesh was rejected")
    prep.add_argument("--categories", default=None, metavar="A,B",
                      help="Objaverse tree: only objects of these LVIS categories (comma-separated; "
                           "config select_categories)")
    prep.add_argument("--uids", default=None, metavar="FILE",
                      help="only these source uids (Objaverse uids or XL fileIdentifiers), one per "
                           "line; a uid the input lacks becomes a not_found error row (config select_uids_file)")
    prep.add_argument("--limit", type=int, default=None, metavar="N",
                      help="at most N objects: the first N selected uids in sorted order (config select_limit)")
    add_config_args(prep)
    prep.set_defaults(func=_cmd_data_prepare)
    _add_data_cache_command(data_sub)
    _add_data_synth_command(data_sub)


def _add_data_synth_command(data_sub: argparse._SubParsersAction) -> None:
    from mar3d.data.synth import CATEGORIES

    synth = data_sub.add_parser(
        "synth", help="write a procedural corpus of textured objects in the Objaverse 1.0 layout",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Make NUM textured, watertight everyday objects (lathe bodies, extrusions, "
                    "compositions) with random proportions, colours and image textures, and "
                    "write them as OUTPUT/glbs/000-NNN/<uid>.glb with object-paths.json.gz, "
                    "lvis-annotations.json.gz (category -> uids) and metadata/000-NNN.json.gz, "
                    "the layout `mar3d data prepare --input OUTPUT` reads. Object i of a seed is "
                    "the same file on every run, so a larger --num grows a corpus without "
                    "changing what it had.",
        epilog="Categories (family):\n  " + "\n  ".join(
            f"{name} ({family})" for name, (family, _) in sorted(CATEGORIES.items())))
    synth.add_argument("--output", required=True, help="folder to write the corpus to")
    synth.add_argument("--num", type=int, default=None, help="number of objects (default: config num_objects, 1000)")
    synth.add_argument("--seed", type=int, default=None, help="corpus seed (default: config seed, 0)")
    synth.add_argument("--categories", default=None,
                       help="comma-separated categories to make (default: all); objects cycle through them")
    synth.add_argument("--photo-dir", default=None,
                       help="folder of PNG/JPG images to cut photo textures from (e.g. scan texture maps)")
    synth.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU)")
    synth.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    add_config_args(synth)
    synth.set_defaults(func=_cmd_data_synth)


def _add_data_cache_command(data_sub: argparse._SubParsersAction) -> None:
    cache = data_sub.add_parser(
        "cache", help="frozen image-encoder features + VAE posteriors of a dataset -> Parquet (MAR training cache)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the frozen image encoder over every stored view and the frozen VAE over "
                    "N fixed point subsets of every object of a prepared dataset (a Ray Data job, "
                    "one actor per worker loading both models once) and write Parquet shards, "
                    "OUTPUT/manifest.json (which conditioner, VAE, dataset content, surface sizes) "
                    "and OUTPUT/errors.parquet (objects that failed). MAR training reads it with "
                    "--set feature_cache=OUTPUT and refuses a cache made from other inputs.",
        epilog="example:\n"
               "  mar3d data cache --data outputs/data --output outputs/cache \\\n"
               "      --condition-model runs:/LR_RUN/conditioner --vae-model runs:/VAE_RUN/model\n"
               "  mar3d train lr --config train_lr_tiny --set feature_cache=outputs/cache ...\n"
               "surface sizes: --set surface_sizes=[...] must equal the training run's (default:\n"
               "as stored in the dataset).")
    cache.add_argument("--data", required=True, help="prepared dataset (output of `mar3d data prepare`)")
    cache.add_argument("--output", required=True, help="cache folder (shards, manifest.json, errors.parquet)")
    cache.add_argument("--condition-model", required=True,
                       help="the frozen image encoder (a 'cond' model: runs:/RUN/conditioner, models:/.., "
                            "or a folder): the one the MAR run uses")
    cache.add_argument("--vae-model", required=True, help="the frozen VAE (runs:/RUN/model, models:/.., or a folder)")
    cache.add_argument("--subsets", dest="num_subsets", type=int, default=None,
                       help="fixed point subsets encoded per object (default: config num_subsets, 4)")
    cache.add_argument("--dtype", choices=["float16", "float32"], default=None,
                       help="storage type of the encoder features (default float16; latents stay float32)")
    cache.add_argument("--num-workers", type=int, default=None, help="encoder actors (default: config num_workers)")
    cache.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for runs:/ and models:/ URIs")
    cache.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    cache.add_argument("--fail-on-errors", action="store_true",
                       help="exit with status 3 if any object could not be encoded")
    add_config_args(cache)
    cache.set_defaults(func=_cmd_data_cache)
