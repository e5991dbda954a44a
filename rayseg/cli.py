"""The rayseg command line. Each subcommand parses its arguments here and calls one function
of the module that does the job; heavy imports (torch, ray, mlflow) happen inside handlers so
`rayseg --help` and `rayseg config show` stay fast."""

from __future__ import annotations

import argparse
import sys

from rayseg import config as cfgmod
from rayseg.data.scene import PROFILES


class _TrackingUri(argparse.Action):
    """--tracking-uri URI: the same as --set tracking.uri=URI."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), f"tracking.uri={values}"])


def _add_tracking_uri(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", dest="overrides", action=_TrackingUri, default=argparse.SUPPRESS, metavar="URI",
                   help="MLflow store (= --set tracking.uri=URI); a sqlite:///DB keeps artifacts beside DB")


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("config", nargs=None if required else "?", help="experiment TOML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set loss.rpc.eta=0.7 (repeatable)")
    _add_tracking_uri(p)


def _load(args: argparse.Namespace) -> cfgmod.Experiment:
    return cfgmod.load(args.config, args.overrides)


def cmd_config_show(args: argparse.Namespace) -> int:
    exp = _load(args)
    print(cfgmod.dumps(exp.config), end="")
    if exp.grid:
        print("\n# [grid]: %d points" % len(cfgmod.grid_points(exp)))
        for k, v in exp.grid.items():
            print(f"#   {k} = {v}")
    return 0


def cmd_prepare_synthetic(args: argparse.Namespace) -> int:
    from rayseg.data import prepare

    overrides = list(args.overrides)  # the flags are --set overrides, validated the same way
    for key, value in (("num_scenes", args.scenes), ("num_views", args.views), ("seed", args.seed),
                       ("profile", args.profile)):
        if value is not None:
            overrides.append(f"synthetic.{key}={value}")
    if args.image_size is not None:
        width, _, height = args.image_size.lower().partition("x")
        if not (width.isdigit() and height.isdigit()):
            raise cfgmod.ConfigError(f"--image-size: expected WxH such as 320x240, got {args.image_size!r}")
        overrides += [f"synthetic.image_width={width}", f"synthetic.image_height={height}"]
    config = cfgmod.load(args.config, overrides).config
    if args.out is None and args.config is None:
        raise cfgmod.ConfigError("prepare synthetic: give --out DIR, or a config whose data.root is the folder")
    out = args.out if args.out is not None else config.data.root  # the folder the config trains on
    try:
        summary = prepare.prepare_synthetic(config.synthetic, out, num_cpus_per_task=args.num_cpus_per_task)
    except ValueError as exc:  # e.g. the folder holds scenes made with other settings
        print(f"prepare synthetic: {exc}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0 if summary.ok else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    from rayseg.data import inspect, shards

    try:
        return inspect.run_inspect(args.root, verify=args.verify, max_scenes=0 if args.all else 20)
    except (FileNotFoundError, NotADirectoryError, shards.ShardError) as exc:
        print(f"inspect: {exc}", file=sys.stderr)
        return 2


def cmd_doctor(args: argparse.Namespace) -> int:
    from rayseg.doctor import run_doctor

    return run_doctor(args.paths)


def _wh(text: str) -> tuple[int, int]:
    from rayseg.data.scannet import parse_image_size

    try:
        return parse_image_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_prepare_scannet(args: argparse.Namespace) -> int:
    from rayseg.data import scannet

    try:
        opts = scannet.ScanNetOptions(frame_skip=args.frame_skip, image_width=args.image_size[0],
                                      image_height=args.image_size[1],
                                      axis_align=not args.raw_coordinates)
        summary = scannet.prepare_scannet(args.raw, args.splits, args.out, opts,
                                          max_scenes_per_split=args.scenes)
    except (FileNotFoundError, ValueError) as exc:
        print(f"prepare scannet: {exc}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0 if summary.ok else 1


def cmd_prepare_s3dis(args: argparse.Namespace) -> int:
    from rayseg.data import s3dis

    try:
        opts = s3dis.S3DISOptions(val_area=args.val_area, image_width=args.image_size[0],
                                  image_height=args.image_size[1], frame_skip=args.frame_skip,
                                  max_views=args.max_views, room_frame=args.room_frame)
        summary = s3dis.prepare_s3dis(args.raw, args.images, args.out, opts,
                                      angles_root=args.angles, max_rooms_per_area=args.rooms)
    except (FileNotFoundError, ValueError) as exc:
        print(f"prepare s3dis: {exc}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0 if summary.ok else 1


def cmd_check_links(args: argparse.Namespace) -> int:
    from rayseg.data import checklinks, shards

    try:
        opts = checklinks.CheckLinksOptions(num_scenes=args.scenes, tol=args.tol,
                                            max_views=args.views)
        report = checklinks.check_links(args.root, opts, split=args.split)
    except (FileNotFoundError, ValueError, shards.ShardError) as exc:
        print(f"check-links: {exc}", file=sys.stderr)
        return 2
    print(checklinks.format_report(report, opts))
    return 0 if report["aligned"] else 1


def _preflight(root: str, region_column: str = "") -> None:
    """Missing, truncated or foreign shards named now, before Ray reads them (Ray's Parquet reader
    would fail naming no file); with ``region_column``, scenes whose regions were made with other
    parameters than the rest (an unfinished re-partition) are refused too."""
    from rayseg.data import shards
    from rayseg.partition import PartitionError
    from rayseg.partition.job import verify_partitions

    shards.scene_paths(root)
    if region_column:
        problems = verify_partitions(root, [region_column], coverage=False)
        if problems:
            more = f" (and {len(problems) - 1} more: `rayseg doctor {root}`)" if len(problems) > 1 else ""
            raise PartitionError(f"{root}: {problems[0]}{more}")


def cmd_train(args: argparse.Namespace) -> int:
    from rayseg.train import launch

    if args.resume and args.branch_from:
        raise cfgmod.ConfigError("train: --resume continues a run, --from starts a new one: give one of them")
    cfg = launch.load_run(args.resume) if args.resume else _load(args).config
    _preflight(cfg.data.root, cfg.data.region_column)
    if args.resume:
        run_dir = launch.train(cfg, resume=args.resume)
    else:
        run_dir = launch.train(cfg, branch_from=args.branch_from)
    print(f"run directory: {run_dir}")
    return 0


def cmd_pseudo_label(args: argparse.Namespace) -> int:
    from rayseg import metrics as M
    from rayseg.data import shards
    from rayseg.train import launch

    # MLflow: a 'pseudo-label' pipeline run with a 'pseudo_label' stage run (launch.pseudo_label)
    summary = launch.pseudo_label(args.run, args.out, args.split, overwrite=args.overwrite,
                                  evaluate=not args.no_eval, checkpoint=args.checkpoint)
    if summary["conf"] is not None:
        names = tuple(shards.load_manifest(launch.load_run(args.run).data.root)["class_names"])
        print(M.iou_table(summary["conf"], names,
                          title=f"pseudo-labels vs GT, split {summary['split']} (evaluation only)"))
        if summary["conf_2d"] is not None:
            print(M.iou_table(summary["conf_2d"], names, title=f"the 2D teacher's pseudo-labels on the views of "
                                                                 f"split {summary['split']} vs view GT (evaluation only)"))
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from rayseg.train import launch

    from rayseg.pseudo import check_folder

    if args.resume:
        cfg = launch.load_run(args.resume)
        _preflight(cfg.data.root)
        check_folder(cfg.data.pseudo_labels, cfg.data.root, cfg.data.train_split)
        run_dir = launch.segment(None, None, resume=args.resume)
    else:
        if not args.pseudo_labels:
            raise cfgmod.ConfigError("segment: --pseudo-labels DIR is required (or --resume RUN_DIR)")
        cfg = _load(args).config
        _preflight(cfg.data.root)
        check_folder(args.pseudo_labels, cfg.data.root, cfg.data.train_split)  # complete, one source
        run_dir = launch.segment(cfg, args.pseudo_labels)
    print(f"run directory: {run_dir}")
    return 0


def cmd_oracle_labels(args: argparse.Namespace) -> int:
    from rayseg.oracle import write_oracle_labels

    cfg = _load(args).config
    _preflight(cfg.data.root)
    summary = write_oracle_labels(cfg.data.root, args.out, args.split or cfg.data.train_split,
                                  overwrite=args.overwrite)
    print(f"ORACLE label folder (ground truth of split {summary['settings']['split']!r}, NOT pseudo-labels): "
          f"{args.out} ({summary['written']} of {summary['scenes']} scenes written now)\n"
          f"train the fully supervised upper bound with: rayseg segment {args.config} --pseudo-labels {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rayseg.evaluate import evaluate_run
    from rayseg.train.launch import load_run

    _preflight(load_run(args.run).data.root)
    print(evaluate_run(args.run, args.split, log=not args.no_log)["tables"])
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rayseg.demo import run_demo

    run_demo(args.config, args.overrides)
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from rayseg.data import shards
    from rayseg.partition import PartitionError, job

    cfg = cfgmod.load(args.config, args.overrides).config
    methods = args.methods or [cfg.partition.method]
    try:
        summary = job.run_partition(args.root, methods, cfg, force=args.force,
                                    num_cpus_per_task=args.num_cpus_per_task)
    except (FileNotFoundError, NotADirectoryError, PartitionError, shards.ShardError) as exc:
        print(f"partition: {exc}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0 if summary.ok else 1


def cmd_partition_quality(args: argparse.Namespace) -> int:
    from rayseg.data import shards
    from rayseg.partition import PartitionError, quality

    cfg = cfgmod.load(args.config, args.overrides).config
    if args.tracking_uri:
        cfg = cfgmod.replace(cfg, **{"tracking.uri": args.tracking_uri})
    try:
        quality.run_quality(args.root, args.methods or [cfg.partition.method], cfg, split=args.split)
    except (FileNotFoundError, NotADirectoryError, PartitionError, shards.ShardError) as exc:
        print(f"partition-quality: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_stream(args: argparse.Namespace) -> int:
    from rayseg.data import pipeline, shards
    from rayseg.data.scene import SceneError

    cfg = _load(args).config
    split = args.split or (cfg.data.val_split if args.mode == "eval" else cfg.data.train_split)
    try:
        shards.scene_paths(cfg.data.root, split)  # missing / truncated shards named before Ray reads them
        pipeline.plan(cfg.data.root, split, cfg, args.mode, args.epoch)  # named errors before Ray starts
        if args.ray:
            from rayseg.raylocal import init_ray

            init_ray(cfg.ray.address)  # a local Ray listens on 127.0.0.1 only
        pipeline.stream(cfg, split, args.mode, args.epoch, use_ray=args.ray, max_batches=args.batches)
    except (FileNotFoundError, pipeline.PipelineError, shards.ShardError, SceneError) as exc:
        print(f"stream: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from rayseg.train import tune

    try:
        sweep = tune.prepare_sweep(args.config, args.overrides, name=args.name, resume=args.resume)
    except tune.SweepError as exc:
        print(f"tune: {exc}", file=sys.stderr)
        return 2
    result = tune.run_sweep(sweep)
    print(f"sweep directory: {result['sweep_dir']}")
    return 1 if result["errors"] or result.get("unfinished") else 0  # interrupted = not a success


def cmd_export(args: argparse.Namespace) -> int:
    from rayseg import export
    from rayseg.data import shards

    try:
        export.run_export(args.source, args.what, args.out, args.format, args.scene_ids, args.scenes,
                          args.split, args.pseudo_labels)
    except (export.ExportError, FileNotFoundError, shards.ShardError) as exc:
        print(f"export: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from rayseg import export
    from rayseg.data import shards

    try:
        export.run_render(args.source, args.what, args.out, args.scene_ids, args.scenes, args.split,
                          args.pseudo_labels)
    except (export.ExportError, FileNotFoundError, shards.ShardError) as exc:
        print(f"render: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_bench_model(args: argparse.Namespace) -> int:
    from rayseg.sparse import bench

    return bench.run(args)


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rayseg import report

    uri = args.tracking_uri or f"sqlite:///{Path(cfgmod.TrackingConfig().runs_dir).resolve() / 'mlflow.db'}"
    try:
        result = report.run_report(uri, args.experiments, args.format, args.out, sweep=args.sweep,
                                   log=not args.no_log)
    except report.ReportError as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 2
    print(result["text"], end="")
    for name, paths in result["files"].items():
        print(f"# {name}: " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from rayseg.predict import PredictError, run_predict

    # where models:/ and runs:/ URIs are looked up (default: the store `rayseg train` writes)
    if args.tracking_uri or not os.environ.get("MLFLOW_TRACKING_URI"):
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri or \
            f"sqlite:///{(Path(cfgmod.TrackingConfig().runs_dir) / 'mlflow.db').resolve()}"
    try:
        result = run_predict(args.model, args.inputs, args.out, split=args.split, allow_no_color=args.allow_no_color,
                             actors=args.actors, use_gpu=args.gpu)
    except PredictError as exc:
        print(f"rayseg predict: {exc}", file=sys.stderr)
        return 2
    print(f"{len(result['scans'])} scan(s) labelled in {result['out']} ({len(result['errors'])} failed); "
          f"histogram: {result['out'] / 'histogram.csv'}")
    return 1 if result["errors"] else 0


def _add_predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="label your own scans (PLY) or a prepared dataset with a trained model")
    p.add_argument("model", metavar="MODEL",
                   help="a run directory (seg run: segmenter; train run: EMA teacher) or an MLflow model: "
                        "models:/<id or name/version>, runs:/<run id>/<name>, or a folder with an MLmodel file")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="PLY files (x y z + red green blue; normals estimated when missing) or prepared dataset folders")
    p.add_argument("--out", required=True, help="output folder: <scan>.labels.ply/.npy, <scan>.histogram.json, "
                                                "histogram.csv")
    p.add_argument("--split", default=None, help="for a dataset input: only this split (default all scenes)")
    p.add_argument("--allow-no-color", action="store_true",
                   help="accept PLYs without colours (mid-grey is used; predictions get much worse)")
    p.add_argument("--actors", type=int, default=1, help="model copies predicting in parallel (Ray Data actors)")
    p.add_argument("--gpu", action="store_true", help="one GPU per actor")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store for models:/ and runs:/ URIs (default MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db)")
    p.set_defaults(func=cmd_predict)


def cmd_pretrain_2d(args: argparse.Namespace) -> int:
    from rayseg.pretrain2d import pretrain_2d

    cfg = _load(args).config
    path = pretrain_2d(cfg, args.out, force=args.force)
    corpus = "synthetic object crops" if cfg.pretrain_2d.task == "crops" else "per-pixel labels of synthetic rooms"
    print(f"2D stand-in weights (NOT ImageNet; {corpus}): {path}\n"
          f"use them with --set model.init_2d={path}")
    return 0


def _add_pretrain_2d_parser(sub) -> None:
    p = sub.add_parser("pretrain-2d", help="a STAND-IN for ImageNet 2D weights: a ResNet trained on object "
                                           "crops of synthetic rooms of their own seed (cached)")
    _add_config_args(p, required=False)
    p.add_argument("--out", default=None, help="output file (default: the per-machine cache, pretrain_2d.cache_dir)")
    p.add_argument("--force", action="store_true", help="train again even when a file with these settings exists")
    p.set_defaults(func=cmd_pretrain_2d)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayseg", description="rayseg: scene-level tags -> per-point pseudo-labels -> a 3D segmenter, on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="show the fully resolved config of an experiment file")
    csub = p.add_subparsers(dest="config_command", required=True)
    ps = csub.add_parser("show", help="print the resolved config as TOML")
    _add_config_args(ps, required=False)
    ps.set_defaults(func=cmd_config_show)

    # prepare / inspect (rayseg.data.prepare, rayseg.data.inspect). `prepare` is a group:
    # dataset readers add `prepare_sub.add_parser("<dataset>")` next to `synthetic`.
    p = sub.add_parser("prepare", help="preprocess a dataset into Parquet shards + manifest.json")
    prepare_sub = p.add_subparsers(dest="prepare_command", required=True)
    ps = prepare_sub.add_parser("synthetic", help="generate procedural RGB-D indoor scenes")
    _add_config_args(ps, required=False)
    ps.add_argument("--out", default=None, help="output dataset folder (default: the config's data.root)")
    ps.add_argument("--scenes", type=int, default=None, help="number of scenes (default 64)")
    ps.add_argument("--views", type=int, default=None, help="views per scene (default 8)")
    ps.add_argument("--seed", type=int, default=None, help="generator seed (default 0)")
    ps.add_argument("--profile", choices=sorted(PROFILES), default=None,
                    help="class set / room style (default scannet20)")
    ps.add_argument("--image-size", default=None, metavar="WxH", help="view size (default 320x240)")
    ps.add_argument("--num-cpus-per-task", type=float, default=1.0, help="Ray CPUs per scene task")
    ps.set_defaults(func=cmd_prepare_synthetic)
    p = sub.add_parser("inspect", help="summarise a prepared dataset; --verify checks every file")
    p.add_argument("root", help="prepared dataset folder")
    p.add_argument("--verify", action="store_true",
                   help="re-read every file: checksums, Parquet, schema, scene contract")
    p.add_argument("--all", action="store_true", help="list every scene (default: the first 20)")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("doctor", help="check datasets, partitions, pseudo-labels, runs and sweeps against "
                                      "their manifests and records, in one pass")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="a dataset, pseudo-label folder, run or sweep directory (a run also checks its "
                        "dataset and pseudo-labels)")
    p.set_defaults(func=cmd_doctor)

    # prepare scannet / prepare s3dis / check-links (rayseg.data.scannet, .s3dis, .checklinks)
    ps = prepare_sub.add_parser("scannet", help="ScanNet v2 scans (+ .sens or exported frames)")
    ps.add_argument("--raw", required=True, nargs="+", metavar="DIR",
                    help="folder(s) holding <scene>/ directories, e.g. scans scans_test")
    ps.add_argument("--splits", required=True, metavar="DIR",
                    help="folder with scannetv2_train.txt / _val.txt / _test.txt")
    ps.add_argument("--out", required=True, help="output dataset folder")
    ps.add_argument("--frame-skip", type=int, default=20, help="keep every k-th frame (default 20)")
    ps.add_argument("--image-size", type=_wh, default=(320, 240), metavar="WxH",
                    help="view size (default 320x240)")
    ps.add_argument("--raw-coordinates", action="store_true",
                    help="keep raw scan coordinates (default: apply axisAlignment to points and poses)")
    ps.add_argument("--scenes", type=int, default=0, metavar="N",
                    help="at most N scenes per split (default all)")
    ps.set_defaults(func=cmd_prepare_scannet)
    ps = prepare_sub.add_parser("s3dis", help="S3DIS rooms + 2D-3D-S views")
    ps.add_argument("--raw", required=True, metavar="DIR",
                    help="Stanford3dDataset_v1.2 (recommended) or ..._Aligned_Version folder")
    ps.add_argument("--images", default=None, metavar="DIR",
                    help="2D-3D-S folder with area_N/data/{rgb,depth,pose} (omit: 3D only)")
    ps.add_argument("--out", required=True, help="output dataset folder")
    ps.add_argument("--angles", default=None, metavar="DIR",
                    help="folder with Area_N/Area_N_alignmentAngle.txt for an Aligned_Version copy "
                         "(default: read from --raw, else estimated from the views' depth)")
    ps.add_argument("--val-area", type=int, default=5, help="area used as val (default 5)")
    ps.add_argument("--image-size", type=_wh, default=(256, 256), metavar="WxH",
                    help="view size (default 256x256)")
    ps.add_argument("--frame-skip", type=int, default=1, help="keep every k-th view of a room")
    ps.add_argument("--max-views", type=int, default=0, help="at most N views per room (0 = all)")
    ps.add_argument("--room-frame", choices=["aligned", "global"], default="aligned",
                    help="rooms rotated to their canonical frame (default) or 2D-3D-S area frame")
    ps.add_argument("--rooms", type=int, default=0, metavar="N",
                    help="at most N rooms per area (default all)")
    ps.set_defaults(func=cmd_prepare_s3dis)
    p = sub.add_parser("check-links", help="are a prepared dataset's views aligned with its points?")
    p.add_argument("root", help="prepared dataset folder")
    p.add_argument("--scenes", type=int, default=5, help="scenes to check (default 5)")
    p.add_argument("--views", type=int, default=8, help="views per scene (default 8)")
    p.add_argument("--tol", type=float, default=0.05, help="link depth tolerance, m (default 0.05)")
    p.add_argument("--split", default=None, help="only scenes of this split")
    p.set_defaults(func=cmd_check_links)

    # train / pseudo-label / segment / evaluate / demo (rayseg.train, rayseg.pseudo, rayseg.evaluate)
    p = sub.add_parser("train", help="stages cmg -> cmg_rpc (teacher-student) on Ray Train")
    _add_config_args(p, required=False)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest checkpoint")
    p.add_argument("--from", dest="branch_from", metavar="RUN_DIR|CHECKPOINT",
                   help="a new run that starts at stage cmg_rpc from RUN_DIR's finished stage cmg (every "
                        "setting acting in stage cmg must equal this config's; checked), or from any stage "
                        "cmg / cmg_rpc CHECKPOINT folder of a run (a chained schedule: settings may differ, "
                        "and those that do are recorded)")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("pseudo-label", help="EMA teacher -> pseudo-label shards (Ray Data, resumable)")
    p.add_argument("run", help="training run directory")
    p.add_argument("--out", required=True, help="pseudo-label output folder")
    p.add_argument("--split", default=None, help="split to label (default data.train_split)")
    p.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="label with this checkpoint of the run (a state.pt or its folder under RUN/checkpoints/, "
                        "e.g. the end of stage cmg; default: the newest)")
    p.add_argument("--no-eval", action="store_true", help="skip the mIoU-vs-GT report")
    p.add_argument("--overwrite", action="store_true",
                   help="relabel a folder that holds labels of another checkpoint or settings (default: refused)")
    p.set_defaults(func=cmd_pseudo_label)
    p = sub.add_parser("segment", help="stage seg: a fresh MinkUNet trained on pseudo-labels")
    _add_config_args(p, required=False)
    p.add_argument("--pseudo-labels", metavar="DIR", help="output of `rayseg pseudo-label`")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a seg run from its newest checkpoint")
    p.set_defaults(func=cmd_segment)
    p = sub.add_parser("oracle-labels", help="ORACLE: the train split's ground-truth labels as a pseudo-label "
                                             "folder, for `segment` (the fully supervised upper bound)")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="output folder (resumable; then `rayseg segment CONFIG "
                                                "--pseudo-labels OUT`)")
    p.add_argument("--split", default=None, help="split to copy (default data.train_split)")
    p.add_argument("--overwrite", action="store_true",
                   help="rewrite a folder that holds labels of another source (default: refused)")
    p.set_defaults(func=cmd_oracle_labels)
    p = sub.add_parser("evaluate", help="mIoU / per-class IoU of a run on a split")
    p.add_argument("run", help="run directory (train or seg)")
    p.add_argument("--split", default=None, help="split (default data.val_split)")
    p.add_argument("--no-log", action="store_true", help="do not log to the run's MLflow run")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("demo", help="the whole chain on synthetic data with a local Ray + sqlite MLflow")
    p.add_argument("--config", default=None, help="demo config (default experiments/synthetic-demo-s3dis.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _add_tracking_uri(p)
    p.set_defaults(func=cmd_demo)

    # partition / partition-quality (rayseg.partition.job, rayseg.partition.quality)
    methods_help = ("pointwise, vccs, region_growing, vccs_rg, shape_detection, or gt (the GT-instance "
                    "ORACLE); repeatable (default partition.method)")
    p = sub.add_parser("partition", help="add region_<method> columns (points and views) to every scene")
    p.add_argument("root", help="prepared dataset folder")
    p.add_argument("--method", dest="methods", action="append", default=[], help=methods_help)
    p.add_argument("--config", default=None, help="experiment TOML whose [partition] values to use")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set partition.sd_max_distance=0.02")
    p.add_argument("--force", action="store_true", help="recompute scenes that are up to date")
    p.add_argument("--num-cpus-per-task", type=float, default=1.0, help="Ray CPUs per scene task")
    p.set_defaults(func=cmd_partition)
    p = sub.add_parser("partition-quality",
                       help="regions per scene, region size, oracle mIoU (majority GT class per region)")
    p.add_argument("root", help="prepared, partitioned dataset folder")
    p.add_argument("--method", dest="methods", action="append", default=[], help=methods_help)
    p.add_argument("--split", default=None, help="only scenes of this split (default all)")
    p.add_argument("--config", default=None, help="experiment TOML (tracking settings)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tracking-uri", default=None, help="log to this MLflow store (default tracking.uri; "
                   "not logged when neither is set)")
    p.set_defaults(func=cmd_partition_quality)

    # stream (rayseg.data.pipeline)
    p = sub.add_parser("stream", help="stream a split through the data pipeline: batch sizes and scenes/s")
    _add_config_args(p, required=False)
    p.add_argument("--split", default=None, help="default data.train_split (data.val_split for --mode eval)")
    p.add_argument("--mode", choices=["train", "eval", "infer"], default="train")
    p.add_argument("--epoch", type=int, default=0, help="epoch (scene order and augmentation draws)")
    p.add_argument("--ray", action="store_true", help="through Ray Data (default: the plain loop)")
    p.add_argument("--batches", type=int, default=0, help="stop after this many batches (0 = all)")
    p.set_defaults(func=cmd_stream)

    # tune (rayseg.train.tune)
    p = sub.add_parser("tune", help="Ray Tune sweep over an experiment file's [grid] (one MLflow child run per point)")
    _add_config_args(p)
    p.add_argument("--name", default=None, help="sweep name (default <config name>-sweep-<time>-<id>); "
                   "with --resume: the sweep to continue (default: the newest sweep of this config)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep (Tuner.restore); complete trials are not redone")
    p.set_defaults(func=cmd_tune)

    # report (rayseg.report)
    p = sub.add_parser("report", help="an ablation sweep's table (paper layout) from MLflow: markdown/CSV, plot, per-class IoU")
    p.add_argument("--experiment", dest="experiments", action="append", required=True, metavar="NAME",
                   help="MLflow experiment of a sweep (tracking.experiment, e.g. table8-threshold); repeatable")
    p.add_argument("--sweep", default=None, help="the sweep (parent run) to report (default: the newest)")
    p.add_argument("--format", choices=["markdown", "csv"], default="markdown", help="what to print (both are written)")
    p.add_argument("--out", default="runs/reports", help="folder for report.md/.csv/.png (default runs/reports)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default sqlite:///runs/mlflow.db)")
    p.add_argument("--no-log", action="store_true", help="do not log the report to the sweep's parent run")
    p.set_defaults(func=cmd_report)

    # export / render (rayseg.export)
    for name, helptext in (("export", "coloured PLY files (one colour per class) of GT, pseudo-labels, predictions"),
                           ("render", "PNG pictures (top-down + oblique) of GT vs pseudo-labels vs predictions")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("source", metavar="SCENE_OR_RUN",
                       help="a shard file, a prepared dataset folder, or a run directory")
        p.add_argument("--what", default="gt", help="comma-separated label sets: gt,pseudo,pred (default gt)")
        if name == "export":
            p.add_argument("--format", choices=["ply"], default="ply", help="file format (default ply)")
        p.add_argument("--out", default=None, help="output folder (default RUN/export, else ./export)")
        p.add_argument("--scene", dest="scene_ids", action="append", default=[], metavar="ID",
                       help="scene id of a dataset or run (repeatable; default: the first --scenes)")
        p.add_argument("--scenes", type=int, default=1, metavar="N", help="the first N scenes (default 1)")
        p.add_argument("--split", default=None,
                       help="split to pick scenes from (run default: train with pseudo, else val)")
        p.add_argument("--pseudo-labels", default=None, metavar="DIR",
                       help="pseudo-label folder (default: the run's pseudo_labels/ or its training labels)")
        p.set_defaults(func=cmd_export if name == "export" else cmd_render)

    # bench-model (rayseg.sparse.bench)
    p = sub.add_parser("bench-model", help="time MinkUNet18A forward+backward: torch sparse backend vs MinkowskiEngine")
    p.add_argument("--voxels", type=int, default=100_000, help="voxels of the scanned-surface-like scene")
    p.add_argument("--voxel-size", type=float, default=0.02, help="voxel size in metres (default 0.02)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per backend (0 = library default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backends", default="torch,minkowski", help="comma-separated (default torch,minkowski)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: measure one backend, print JSON
    p.set_defaults(func=cmd_bench_model)

    # predict (rayseg.predict)
    _add_predict_parser(sub)
    _add_pretrain_2d_parser(sub)

    # Subcommands of the other modules register here (one block each).
    return parser


def _data_error_types() -> tuple[type, ...]:
    from rayseg.data.pipeline import PipelineError
    from rayseg.data.pseudo_store import PseudoLabelError
    from rayseg.data.scene import SceneError
    from rayseg.data.shards import ShardError
    from rayseg.partition import PartitionError
    from rayseg.train.checkpoint import UnsafeCheckpointError

    return (FileNotFoundError, NotADirectoryError, ShardError, SceneError, PipelineError, PartitionError,
            PseudoLabelError, UnsafeCheckpointError)


def _data_error(exc: BaseException) -> BaseException | None:
    """The data error (a missing, truncated, foreign or stale file, folder or manifest) behind
    ``exc``, also when Ray wrapped it (a task's ``cause``, a Ray Train worker's failure), else None.
    Only explicit causes are followed, never an exception that was merely being handled."""
    kinds = _data_error_types()
    stack, seen = [exc], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # ray.exceptions.RayTaskError keeps the original here
        if isinstance(cause, kinds):
            return cause
        if isinstance(e, kinds):
            return e
        stack += [e.__cause__, cause if isinstance(cause, BaseException) else None]
        failures = getattr(e, "worker_failures", None)  # Ray Train V2's TrainingFailedError
        if isinstance(failures, dict):
            stack += [f for f in failures.values() if isinstance(f, BaseException)]
    return None


def main(argv: list[str] | None = None) -> int:
    import os

    args = build_parser().parse_args(argv)
    if args.command != "bench-model" and "torch" not in sys.modules:
        # Before torch loads OpenMP (Ray workers inherit it): threads that sleep at the end of a
        # parallel region instead of spinning. With the data pipeline, MLflow or anything else on
        # the same cores, spinning threads wait for a descheduled partner at each of the sparse
        # backend's thousands of small ops: the demo's two-branch step at 2 threads took 67-75 s
        # (60 s CPU) on the shared 2-core machine, 3.7-4.3 s with passive waiting (issue 16).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        return int(args.func(args) or 0)
    except cfgmod.ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - data errors become one line; the rest re-raised
        data = _data_error(exc)
        if data is None or os.environ.get("RAYSEG_TRACEBACK"):
            raise
        text = str(data.args[0]) if data.args and isinstance(data.args[0], str) else str(data)
        print(f"rayseg {args.command}: {text}", file=sys.stderr)
        print("  (set RAYSEG_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 2
