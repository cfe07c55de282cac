"""``torchrec-compress`` command line: parses arguments and calls the library."""
from __future__ import annotations

import argparse
from typing import List, Optional



def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a compression ratio >= 1, got {text!r}") from None
    if not value >= 1.0:
        raise argparse.ArgumentTypeError(f"expected a compression ratio >= 1, got {value}")
    return value


def _scheme_names(argv: Optional[List[str]]) -> str:
    """The registry's benchmark presets for the bench/demo help, only when that help is
    asked for: the registry imports torchrec (seconds), which ``--help`` must not wait for."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not any(a in ("bench", "demo") for a in args):
        return "see `torchrec-compress bench quality --help`"
    from .config import presets

    return ", ".join(presets())


def _parser(argv: Optional[List[str]] = None) -> argparse.ArgumentParser:
    names = _scheme_names(argv)
    p = argparse.ArgumentParser(prog="torchrec-compress", description="Embedding compression for TorchRec.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train DLRM on synthetic Criteo-like data: uncompressed vs each scheme",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--steps", type=_positive_int, default=160, help="training steps per run")
    d.add_argument("--batch-size", type=_positive_int, default=2048)
    d.add_argument("--dim", type=_positive_int, default=32, help="embedding dim (multiple of 4)")
    d.add_argument("--ratio", type=_ratio, default=8.0, help="target compression ratio of every scheme (md needs d/ratio >= 4)")
    d.add_argument("--eval-batches", type=_positive_int, default=10, help="held-out batches for AUC / log loss")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--schemes", default="all", help=f"comma-separated; 'none' is the uncompressed model, 'all' every scheme and "
                                                     f"baseline; any of: {names}, mch")
    d.add_argument("--max-rows", type=_positive_int, default=1_000_000, help="cap every table's rows (Criteo Kaggle sizes)")
    d.add_argument("--out", default="runs/demo.json", help="results JSON")
    tr = sub.add_parser("train", help="train DLRM / DLRM_DCN from a YAML config (one process, torchrun or torchx)")
    tr.add_argument("--config", required=True, help="YAML run config, e.g. examples/frappe.yaml")
    tr.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=2 out=runs/x")
    tr.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/latest (any world size)")
    cmp_ = sub.add_parser("compare", help="table and memory-vs-AUC plot of several `train` runs")
    cmp_.add_argument("runs", nargs="+", help="run folders (their results.json)")
    cmp_.add_argument("--plot", default="memory_vs_auc.png", help="PNG to write")
    pl = sub.add_parser("plan", help="compression-aware sharding plan for a memory budget",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = pl.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=["dlrmv2"], help="dlrmv2: the 26 MLPerf DLRMv2 CriteoTB tables at dim 128")
    src.add_argument("--tables", help="YAML list of {name, rows, dim[, features, pooling_factor, importance]}")
    pl.add_argument("--world-size", type=_positive_int, required=True)
    pl.add_argument("--memory-per-rank", required=True, help="e.g. 16GiB (embeddings + optimizer state)")
    pl.add_argument("--compute-device", choices=["cpu", "cuda"], default="cpu")
    pl.add_argument("--json", default=None, help="also write the plan as JSON here")
    b = sub.add_parser("bench", help="benchmarks against stock TorchRec in the same run")
    bsub = b.add_subparsers(dest="bench", required=True)
    bq = bsub.add_parser("quality", help="AUC vs memory of every scheme and ratio against uncompressed (3 seeds)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bq.add_argument("--data", choices=["synthetic", "synthetic_first_order", "frappe", "criteo", "avazu", "movielens"], default="synthetic",
                    help="synthetic: the realistic generator (clustered latents, pairwise interactions, Bayes AUC 0.80)")
    bq.add_argument("--cardinalities", default=None, help="synthetic: comma-separated table sizes (default: 13 tables of 3-20k rows)")
    bq.add_argument("--batch-size", type=_positive_int, default=512, help="synthetic: training batch size")
    bq.add_argument("--root", default="../shared/data/frappe", help="frappe: the libFM folder")
    bq.add_argument("--path", default=None, help="criteo: a TSV file, avazu / movielens: a CSV file (default: the one in ../shared/data)")
    bq.add_argument("--schemes", default="all", help=f"comma-separated, from: {names}; equal-bytes baselines md, mch, fp16, int8, int4")
    bq.add_argument("--ratios", default="4,10,100", help="target compression ratios of the large tables")
    bq.add_argument("--seeds", default="0,1,2")
    bq.add_argument("--epochs", type=_positive_int, default=5)
    bq.add_argument("--dim", type=_positive_int, default=16)
    bq.add_argument("--min-rows", type=_positive_int, default=500, help="tables with fewer rows stay exact")
    bq.add_argument("--batches", type=_positive_int, default=100, help="synthetic: training batches (x512) per epoch")
    bq.add_argument("--out", default="runs/bench_quality.json", help="results JSON (the frontier plot goes beside it, .png)")
    bs = bsub.add_parser("speed", help="train-step and inference samples/s of each scheme vs stock TorchRec, same tables",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bs.add_argument("--sizes", choices=["kaggle", "criteotb"], default="kaggle", help="Criteo Kaggle or CriteoTB (MLPerf) cardinalities")
    bs.add_argument("--max-rows", type=int, default=1_000_000, help="cap on table sizes (<= 0: none)")
    bs.add_argument("--dim", type=_positive_int, default=64)
    bs.add_argument("--ratio", type=_ratio, default=10.0, help="compression ratio of the tables with >= 10k rows")
    bs.add_argument("--batch-size", type=_positive_int, default=2048)
    bs.add_argument("--batches", type=_positive_int, default=8)
    bs.add_argument("--reps", type=_positive_int, default=3)
    bs.add_argument("--schemes", default="hashing,qr,qr_add,memcom,memrec,freq_threshold,fiited", help=f"comma-separated, from: {names}")
    bs.add_argument("--out", default=None, help="results JSON")
    bs.add_argument("--ranks", type=_positive_int, default=1, help="training steps on this many gloo ranks (no inference)")
    bs.add_argument("--step-counts", action="store_true",
                    help="instead: host syncs and ops per training step of each scheme, 26 vs 52 features, while its "
                         "procedure runs (3 warm-up steps) and after it (201; both between FIITED's re-planning events)")
    bi = bsub.add_parser("inference", help="lookups/s of exported quantized tables vs stock TorchRec FP32/FP16",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bi.add_argument("--max-rows", type=_positive_int, default=1_000_000, help="cap on the Criteo Kaggle table sizes")
    bi.add_argument("--dim", type=_positive_int, default=64)
    bi.add_argument("--batch-size", type=_positive_int, default=2048)
    bi.add_argument("--batches", type=_positive_int, default=8)
    bi.add_argument("--reps", type=_positive_int, default=5)
    bi.add_argument("--out", default=None, help="results JSON")
    return p


def main(argv: Optional[List[str]] = None) -> None:
    args = _parser(argv).parse_args(argv)
    if args.command == "demo":
        from .data.synthetic import CRITEO_KAGGLE_CARDINALITIES
        from .demo import run_demo  # torchrec imports are slow; keep --help fast

        cards = [min(v, args.max_rows) for v in CRITEO_KAGGLE_CARDINALITIES]
        if args.dim % 4:
            raise SystemExit(f"torchrec-compress demo: --dim {args.dim}: FBGEMM needs a multiple of 4")
        run_demo(steps=args.steps, batch_size=args.batch_size, dim=args.dim, ratio=args.ratio,
                 eval_batches=args.eval_batches, seed=args.seed,
                 schemes=None if args.schemes == "all" else [s for s in args.schemes.split(",") if s],
                 out=args.out, cardinalities=cards)


    elif args.command == "train":
        from .train.config import load_config
        from .train.run import train

        try:
            train(load_config(args.config, args.overrides), resume=args.resume)
        except ValueError as e:  # bad config or data: say what, without a traceback
            raise SystemExit(f"torchrec-compress train: {e}")
    elif args.command == "compare":
        from .train.report import format_runs, load_runs, plot_memory_vs_auc

        try:
            runs = load_runs(args.runs)
        except ValueError as e:
            raise SystemExit(f"torchrec-compress {e}")
        print(format_runs(runs))
        if plot_memory_vs_auc(runs, args.plot):
            print(f"wrote {args.plot}")
    elif args.command == "plan":
        _plan(args)
    elif args.command == "bench" and args.bench == "quality":
        _bench_quality(args)
    elif args.command == "bench" and args.bench == "speed":
        import json

        from .benchmarks.speed import bench_speed, format_speed
        from .config import presets

        schemes = [x for x in args.schemes.split(",") if x]
        unknown = sorted(set(schemes) - set(presets()))
        if unknown:
            raise SystemExit(f"torchrec-compress bench speed: unknown schemes {unknown}; use any of {sorted(presets())}")
        if args.step_counts:
            from .benchmarks.speed import bench_step_counts, format_step_counts

            res = bench_step_counts(schemes)
            print(format_step_counts(res))
        else:
            res = bench_speed(sizes=args.sizes, max_rows=args.max_rows if args.max_rows > 0 else None, dim=args.dim,
                              ratio=args.ratio, batch=args.batch_size, batches=args.batches, reps=args.reps, schemes=schemes,
                              ranks=args.ranks, inference=args.ranks == 1)
            print(format_speed(res))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)
    elif args.command == "bench" and args.bench == "inference":
        import json

        from .benchmarks.inference import bench_inference, format_results

        res = bench_inference(max_rows=args.max_rows, dim=args.dim, batch=args.batch_size, batches=args.batches, reps=args.reps)
        print(format_results(res))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)


SYNTHETIC_BENCH_CARDINALITIES = [1000, 500, 20000, 20000, 300, 24, 5000, 600, 3, 20000, 5000, 20000, 3000]
DEFAULT_PATHS = {  # the real sets in ../shared/data (read there, never copied)
    "criteo": "../shared/data/criteo_kaggle_sample/criteo_train_10k.tsv.gz",
    "avazu": "../shared/data/avazu_sample/avazu_train_10k.csv.gz",
    "movielens": "../shared/data/movielenslatest_x1/movielenslatest_x1_test_200k.csv.gz",
}


def _bench_quality(args: argparse.Namespace) -> None:
    import json
    import os

    from .benchmarks import quality as q

    try:
        ratios = [float(r) for r in args.ratios.split(",") if r]
        seeds = [int(x) for x in args.seeds.split(",") if x]
    except ValueError:
        raise SystemExit(f"torchrec-compress bench quality: --ratios / --seeds must be comma-separated numbers, got {args.ratios!r} / {args.seeds!r}")
    schemes = q.all_schemes() if args.schemes == "all" else [s for s in args.schemes.split(",") if s]
    path = args.path or DEFAULT_PATHS.get(args.data)
    try:
        if args.data == "frappe":
            data = q.frappe_data(args.root)
        elif args.data == "criteo":
            from .data.synthetic import CRITEO_KAGGLE_CARDINALITIES

            data = q.criteo_tsv_data(path, [min(v, 100_000) for v in CRITEO_KAGGLE_CARDINALITIES])
        elif args.data == "avazu":
            data = q.avazu_data(path)
        elif args.data == "movielens":
            data = q.movielens_data(path)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"torchrec-compress bench quality: {e}")
    if args.data.startswith("synthetic"):
        try:
            cards = [int(v) for v in args.cardinalities.split(",")] if args.cardinalities else SYNTHETIC_BENCH_CARDINALITIES
        except ValueError:
            raise SystemExit(f"torchrec-compress bench quality: --cardinalities must be comma-separated ints, got {args.cardinalities!r}")
        data = q.synthetic_data(cards, batches=args.batches, batch_size=args.batch_size, first_order=args.data == "synthetic_first_order")
    try:
        res = q.bench_quality(data, schemes, ratios, seeds, epochs=args.epochs, dim=args.dim, min_rows=args.min_rows)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"torchrec-compress bench quality: {e}")
    print(q.format_quality(res))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    plot = q.plot_frontier(res, os.path.splitext(args.out)[0] + ".png")
    print(f"wrote {args.out}" + (f" and {plot}" if plot else ""))


def _plan(args: argparse.Namespace) -> None:
    from torchrec import EmbeddingBagConfig

    from .distributed.planner import parse_bytes, plan_compression_, tables_module

    if args.world_size < 1:
        raise SystemExit(f"--world-size must be >= 1, got {args.world_size}")
    importance, pooling = {}, {}
    if args.preset == "dlrmv2":
        from .data.mlperf import DLRMV2_CARDINALITIES, DLRMV2_DIM, DLRMV2_MULTI_HOT

        from .data.synthetic import cat_names
        from .models import logical_tables

        tables = logical_tables(cat_names(len(DLRMV2_CARDINALITIES)), DLRMV2_CARDINALITIES, DLRMV2_DIM)
        pooling = {f"t_cat_{i}": float(h) for i, h in enumerate(DLRMV2_MULTI_HOT)}
    else:
        import yaml

        with open(args.tables) as f:
            spec = yaml.safe_load(f)
        if not isinstance(spec, list) or not spec:
            raise SystemExit(f"{args.tables}: expected a non-empty YAML list of tables")
        tables = []
        for i, t in enumerate(spec):
            missing = [k for k in ("name", "rows", "dim") if k not in t]
            if missing:
                raise SystemExit(f"{args.tables}: table #{i} lacks {missing} (allowed keys: name, rows, dim, features, pooling_factor, importance)")
            tables.append(EmbeddingBagConfig(name=t["name"], num_embeddings=int(t["rows"]), embedding_dim=int(t["dim"]),
                                             feature_names=list(t.get("features", [t["name"]]))))
            pooling[t["name"]] = float(t.get("pooling_factor", 1.0))
            importance[t["name"]] = float(t.get("importance", 1.0))
    try:
        plan = plan_compression_(tables_module(tables), args.world_size, parse_bytes(args.memory_per_rank),
                                 compute_device=args.compute_device, importance=importance, pooling_factors=pooling)
    except ValueError as e:
        raise SystemExit(f"torchrec-compress plan: {e}")
    print(plan)
    if args.json:
        with open(args.json, "w") as f:
            f.write(plan.to_json())


if __name__ == "__main__":
    main()
