"""``compress run | validate | predict | bench | quantize | export | report | analyze | search | env | list |
schema`` (and ``--version``).

User errors: one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from compress import __version__
from compress.errors import CompressError, StageFailed


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other user error
        print(f"compress: error: {message} (see 'compress --help')", file=sys.stderr)
        raise SystemExit(2)


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _words(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="compress", description="Distill, prune, export and quantize a PyTorch model from one recipe.")
    p.add_argument("--version", action="version", version=f"compress {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def recipe_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("recipe", type=Path, help="recipe YAML file")
        sp.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a field, e.g. --set stages.1.kd.temperature=2 (repeatable)",
        )

    run = sub.add_parser("run", help="run a recipe end to end")
    recipe_args(run)
    run.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<name>-<time>)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    run.add_argument(
        "--resume", type=Path, default=None, metavar="RUN_DIR", help="continue an interrupted run (same recipe)"
    )
    run.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    val = sub.add_parser("validate", help="load and validate a recipe; print it resolved")
    recipe_args(val)
    pred = sub.add_parser("predict", help="top-k classes for images from an exported ONNX model (no torch needed)")
    from compress.deploy import add_predict_arguments

    add_predict_arguments(pred)
    ben = sub.add_parser("bench", help="measure ONNX files, checkpoints or runs: accuracy, size, MACs, memory, latency")
    ben.add_argument(
        "models",
        nargs="+",
        help="MODEL.onnx, CHECKPOINT.pt (or FILE.pt:MODEL_NAME), or a run directory; a user factory a checkpoint "
        "names runs only when you name it too: FILE.pt:pkg.mod:fn or RUN_DIR:pkg.mod:fn",
    )
    ben.add_argument("--data", default=None, help="dataset name (default: from the run's recipe or the ONNX metadata)")
    ben.add_argument("--root", default=None, help="dataset root (for cifar10 / imagefolder)")
    ben.add_argument("--batch-sizes", type=_ints, default=[1, 32], help="comma-separated (default 1,32)")
    ben.add_argument("--threads", type=_ints, default=None, help="comma-separated CPU thread counts (default: all)")
    ben.add_argument("--devices", type=_words, default=["cpu", "cuda"], help="cpu,cuda (cuda skipped with a note)")
    ben.add_argument(
        "--runtime",
        type=_words,
        default=["onnxruntime", "torch"],
        help="onnxruntime (or ort), openvino (ONNX files, CPU), torch, torch-compile (default onnxruntime,torch)",
    )
    ben.add_argument("--warmup", type=int, default=10)
    ben.add_argument("--iters", type=int, default=100)
    ben.add_argument("--out", type=Path, default=None, help="output folder (default runs/bench-<time>)")
    ben.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    ben.add_argument("--quiet", action="store_true", help="no progress bar or table")
    qua = sub.add_parser(
        "quantize", help="an ONNX file from anywhere (float NCHW input) -> INT8, both measured side by side"
    )
    qua.add_argument(
        "model", type=Path, help="MODEL.onnx: one float (N, C, H, W) input, logits out; no metadata needed"
    )
    qua.add_argument(
        "--data",
        required=True,
        help="calibration and test data: a dataset name (digits, cifar10 --root PATH, synthetic), an ImageFolder "
        "root (train/ + val/ or test/), or package.module:function",
    )
    qua.add_argument("--root", default=None, help="dataset root (for cifar10 / imagefolder by name)")
    qua.add_argument(
        "--calibration", default="percentile", choices=["minmax", "entropy", "percentile"], help="activation ranges"
    )
    qua.add_argument("--calibration-batches", type=int, default=16, help="training batches of 32 (default 16)")
    qua.add_argument("--scheme", default="auto", help="INT8 scheme (compress list); auto = the fastest exact here")
    qua.add_argument("--mean", type=_floats, default=None, help="per-channel mean the model expects, in [0, 1] units")
    qua.add_argument("--std", type=_floats, default=None, help="per-channel std the model expects")
    qua.add_argument("--image-size", type=int, default=None, help="for a graph whose height/width are not fixed")
    qua.add_argument("--batch-sizes", type=_ints, default=[1], help="latency batch sizes, comma-separated (default 1)")
    qua.add_argument("--threads", type=int, default=None, help="CPU threads to time at (default: all)")
    qua.add_argument("--warmup", type=int, default=5)
    qua.add_argument("--iters", type=int, default=50)
    qua.add_argument("--out", type=Path, default=None, help="report directory (default runs/quantize-<name>-<time>)")
    qua.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    qua.add_argument("--quiet", action="store_true", help="no progress or table")
    exp = sub.add_parser("export", help="a checkpoint -> self-describing ONNX (preprocessing in the graph, parity)")
    exp.add_argument("checkpoint", type=Path, help="a compress checkpoint, or a plain state_dict with --model")
    exp.add_argument("--model", default=None, help="model name (registered, torchvision:NAME, package.module:fn)")
    exp.add_argument(
        "--data", default=None, help="dataset name, ImageFolder root or package.module:function (default: the run's)"
    )
    exp.add_argument("--root", default=None, help="dataset root (for cifar10 / imagefolder by name)")
    exp.add_argument("--out", type=Path, default=None, help="FILE.onnx (default: beside the checkpoint)")
    exp.add_argument("--opset", type=int, default=18)
    exp.add_argument("--layout", default="nhwc", choices=["nhwc", "nchw"], help="uint8 input layout (default nhwc)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    rep = sub.add_parser("report", help="re-render one run's report, or compare several runs (Markdown, HTML, plots)")
    rep.add_argument("runs", nargs="+", type=Path, help="run directories (or their report.json)")
    rep.add_argument(
        "--out", type=Path, default=None, help="output folder (default: the run itself, or runs/compare-<time>)"
    )
    ana = sub.add_parser("analyze", help="analyses that guide a recipe")
    ana_sub = ana.add_subparsers(dest="analysis", required=True, parser_class=_Parser)
    sens = ana_sub.add_parser(
        "sensitivity", help="per-layer pruning sensitivity of the recipe's student: JSON + PNG, derived ratios"
    )
    recipe_args(sens)
    sens.add_argument("--ratios", type=_floats, default=[0.1, 0.3, 0.5, 0.7, 0.9], help="comma-separated sweep")
    sens.add_argument("--images", type=int, default=2000, help="test images evaluated per point (default 2000)")
    sens.add_argument("--target-macs", type=float, default=None, help="derive per-layer ratios keeping this MACs share")
    sens.add_argument("--out", type=Path, default=None, help="output folder (default runs/sensitivity-<time>)")
    sens.add_argument("--quiet", action="store_true", help="no progress bar")
    srch = sub.add_parser(
        "search", help="the most accurate student that meets the recipe's target: (measured latency, size, MACs)"
    )
    recipe_args(srch)
    srch.add_argument(
        "--budget", action="append", default=[], metavar="KEY=VALUE",
        help="set a target: field, e.g. --budget latency_ms=0.3 --budget threads=2 (repeatable)",
    )  # fmt: skip
    srch.add_argument("--trials", type=int, default=None, help="candidates given a short KD fine-tune")
    srch.add_argument("--candidates", type=int, default=None, help="most candidate architectures timed")
    srch.add_argument(
        "--out", type=Path, default=None, help="search folder (default runs/search-<name>); a rerun resumes"
    )
    srch.add_argument("--run", action="store_true", help="then run recipe.best.yaml into <out>/run (fine-tuned fully)")
    srch.add_argument("--quiet", action="store_true", help="no progress bars")
    env = sub.add_parser("env", help="this machine: versions, CPU instruction sets, which INT8 schemes are exact here")
    env.add_argument("--json", action="store_true", help="print one JSON document")
    sub.add_parser("list", help="list registered stages, models, datasets, losses, importances and INT8 schemes")
    sub.add_parser("schema", help="print the recipe's JSON Schema")
    return p


def _list() -> None:
    from rich.console import Console
    from rich.table import Table

    from compress.bench.runtimes import RUNTIMES
    from compress.data import DATASETS
    from compress.distill import LOSSES
    from compress.importance import IMPORTANCES
    from compress.models import MODELS
    from compress.quantization.schemes import SCHEMES
    from compress.stages import STAGES

    console = Console()
    for title, registry in (
        ("stages", STAGES),
        ("models", MODELS),
        ("datasets", DATASETS),
        ("distillation losses", LOSSES),
        ("pruning importances", IMPORTANCES),
        ("INT8 schemes (quantize's scheme:, default auto; qat takes u8s8 and u8s8_reduce_range)", SCHEMES),
        ("runtimes (benchmark.runtimes, target.runtime, compress bench --runtime)", RUNTIMES),
    ):
        table = Table(title=title, title_justify="left")
        table.add_column("name")
        table.add_column("description")
        for name, obj in registry.items():
            doc = (getattr(obj, "summary", None) or obj.__doc__ or "").strip().splitlines()
            table.add_row(name, doc[0] if doc else "")
        console.print(table)
    console.print(
        "models also: torchvision:<name> (any torchvision classifier), timm:<name> (any timm model), "
        "package.module:function"
    )


def _env(as_json: bool) -> None:
    """What decides this machine's numbers: library versions, CPU and instruction sets, training
    precision ``auto``, and ONNX Runtime's INT8 kernels probed for every scheme."""
    import torch

    from compress.env import environment
    from compress.quantization.schemes import SCHEMES, choose, probe
    from compress.training import autocast_dtype

    doc = environment(None)
    doc["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    cpu_auto = autocast_dtype("auto", torch.device("cpu"))
    doc["training_precision_auto_cpu"] = "bf16" if cpu_auto is not None else "fp32"
    doc["int8_schemes"] = {
        name: {
            "static": probe(name).exact,
            "dynamic": probe(name, True).exact if SCHEMES.get(name).activation == "uint8" else None,
            "static_in_precision_mode": probe(name, precision_mode=True).exact,  # session.x64quantprecision=1
            "exact_with": SCHEMES.get(name).exact_with,
        }
        for name in SCHEMES.names()
    }
    auto = choose("auto")
    doc["int8_auto"] = {"static": auto.scheme.name, "dynamic": choose("auto", True).scheme.name}
    doc["int8_auto_reason"] = auto.reason
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    width = max(len(k) for k in doc)
    for key, value in doc.items():
        if key == "int8_schemes":
            for name, r in value.items():
                dyn = "" if r["dynamic"] is None else f", dynamic {'exact' if r['dynamic'] else 'NOT exact'}"
                mode = (
                    ""
                    if r["static"]
                    else f" (in ORT's precision mode: {'exact' if r['static_in_precision_mode'] else 'NOT exact'})"
                )
                print(f"{'int8 ' + name:<{width}}  static {'exact' if r['static'] else 'NOT exact'}{dyn} here{mode}")
        else:
            print(f"{key:<{width}}  {value if not isinstance(value, (dict, list)) else json.dumps(value)}")


def _bench(args: argparse.Namespace) -> None:
    from compress.commands.bench import bench

    options = {
        "batch_sizes": args.batch_sizes,
        "warmup": args.warmup,
        "iters": args.iters,
        "threads": args.threads,
        "devices": args.devices,
        "torch_compile": "torch-compile" in args.runtime,
    }
    bench(
        args.models,
        data_name=args.data,
        root=args.root,
        options=options,
        runtimes=args.runtime,
        out=args.out,
        quiet=args.quiet,
        overwrite=args.overwrite,
    )


def _quantize(args: argparse.Namespace) -> None:
    from compress.commands.quantize import quantize

    for name in ("calibration_batches", "warmup", "iters", "threads", "image_size"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            raise CompressError(f"--{name.replace('_', '-')}: {value} is too small")
    if any(b < 1 for b in args.batch_sizes) or not args.batch_sizes:
        raise CompressError(f"--batch-sizes: {args.batch_sizes} must be positive")
    quantize(
        args.model,
        data=args.data,
        root=args.root,
        calibration=args.calibration,
        calibration_batches=args.calibration_batches,
        scheme=args.scheme,
        mean=args.mean,
        std=args.std,
        image_size=args.image_size,
        out=args.out,
        overwrite=args.overwrite,
        quiet=args.quiet,
        batch_sizes=args.batch_sizes,
        threads=args.threads,
        warmup=args.warmup,
        iters=args.iters,
    )


def _export(args: argparse.Namespace) -> None:
    from compress.commands.export import export

    out, result = export(
        args.checkpoint,
        model=args.model,
        data=args.data,
        root=args.root,
        out=args.out,
        opset=args.opset,
        overwrite=args.overwrite,
        layout=args.layout,
    )
    check = result.parity
    print(
        f"{out}: {result.input}; ONNX Runtime vs PyTorch on {check['batch']} test images: max |Δlogit| "
        f"{check['max_abs_diff']:.2e}, argmax agreement {100 * check['argmax_agreement']:.1f}%"
    )


def _report(runs: list[Path], out: Path | None) -> None:
    import datetime as dt

    from compress.bench.report import load_reports, render

    reports = load_reports(runs)
    if out is None:
        single = runs[0] if runs[0].is_dir() else runs[0].parent
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = single if len(runs) == 1 else Path("runs") / f"compare-{stamp}"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CompressError(f"--out: cannot create {out}: {exc.strerror or exc}") from None
    try:
        written = render(out, reports)
    except OSError as exc:
        raise CompressError(f"--out: cannot write to {out}: {exc.strerror or exc}") from None
    for path in written:
        print(path)


def _search(args: argparse.Namespace) -> None:
    from compress.commands.search import record_final, search

    for name in ("trials", "candidates"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise CompressError(f"--{name}: must be at least 1, got {getattr(args, name)}")
    best = search(args)
    if not args.run:
        return
    from compress.pipeline import run
    from compress.recipe import dump_recipe, load_recipe
    from compress.resume import read_status

    recipe = load_recipe(best)
    run_dir = best.parent / "run"
    state = read_status(run_dir).get("state") if run_dir.is_dir() else None
    resolved = run_dir / "recipe.resolved.yaml"
    if state is not None and (not resolved.is_file() or resolved.read_text() != dump_recipe(recipe)):
        raise CompressError(f"{run_dir}: holds a run of an earlier recipe.best.yaml; move it away to run this one")
    if state == "complete":
        print(f"{run_dir}: the chosen recipe already ran (remove the folder to run it again)", file=sys.stderr)
    else:
        resume = run_dir if state in ("running", "failed") else None  # an interrupted --run continues
        run(recipe, None if resume else run_dir, quiet=args.quiet, resume=resume)
    final = record_final(best)
    verdict = "meets" if final["meets_budget"] else "MISSES"
    latency = "not measured" if final["latency_ms"] is None else f"{final['latency_ms']:.3f} ms"
    print(f"fine-tuned: top-1 {100 * final['top1']:.2f}%, {latency}, {final['size_bytes']:,} bytes: {verdict} the "
          f"budget ({final['path']})", file=sys.stderr)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "predict":  # torch-free: only numpy, onnxruntime and Pillow are imported
        from compress.deploy import DeployError, run_predict

        try:
            return run_predict(args)
        except DeployError as exc:
            print(f"compress: error: {exc}", file=sys.stderr)
            return 2
    try:
        if args.command == "list":
            _list()
        elif args.command == "env":
            _env(args.json)
        elif args.command == "bench":
            _bench(args)
        elif args.command == "quantize":
            _quantize(args)
        elif args.command == "export":
            _export(args)
        elif args.command == "report":
            _report(args.runs, args.out)
        elif args.command == "analyze":
            from compress.commands.analyze import analyze

            analyze(args)
        elif args.command == "search":
            _search(args)
        elif args.command == "schema":
            from compress.recipe import json_schema

            print(json.dumps(json_schema(), indent=2))
        else:
            from compress.recipe import dump_recipe, load_recipe

            recipe = load_recipe(args.recipe, args.overrides)
            if args.command == "validate":
                print(dump_recipe(recipe), end="")
            else:
                from compress.pipeline import run

                if args.resume is not None and (args.overwrite or (args.out and args.out != args.resume)):
                    raise CompressError("--resume: continues RUN_DIR in place; drop --out/--overwrite")
                run(recipe, args.out, overwrite=args.overwrite, quiet=args.quiet, resume=args.resume)
    except CompressError as exc:
        print(f"compress: error: {exc}", file=sys.stderr)
        return 2
    except StageFailed as exc:
        print(f"compress: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("compress: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
