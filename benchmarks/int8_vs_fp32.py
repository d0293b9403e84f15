"""FP32 vs INT8 ONNX latency for one checkpoint, measured side by side in one process.

    python benchmarks/int8_vs_fp32.py CHECKPOINT [--model resnet20] [--name unpruned_resnet20]

CHECKPOINT is a compress checkpoint (e.g. runs/cifar-short/checkpoints/02-distill/student.pt from
benchmarks/cifar_resnet_short.py; pruned checkpoints work too). Exports it, quantizes it with the
quantize stage's defaults (QDQ, U8S8, per-channel, MinMax on 256 CIFAR-10 training images), then
times both files with ONNX Runtime at 2 threads. Writes results/int8_vs_fp32_<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
from pathlib import Path

import torch
from common import ROOT, command, machine, save

from compress.bench.measure import batch_of, onnx_accuracy, percentiles, time_calls
from compress.checkpoint import load_weights, read_checkpoint
from compress.context import Artifact, Context
from compress.env import environment
from compress.models import build_model
from compress.onnx_utils import run, session
from compress.pipeline import load_data
from compress.recipe import load_recipe
from compress.stages import STAGES
from compress.stages.export import export_onnx


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--name", default="resnet20")
    ap.add_argument("--root", default="../shared/data/cifar10-jpeg.tar.gz")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    recipe = load_recipe(ROOT / "recipes" / "cifar_resnet.yaml", [f"data.root={args.root}"])
    data = load_data(recipe)
    model = build_model(args.model, data.num_classes, data.channels)
    state, pruned = read_checkpoint(args.checkpoint, "student", "checkpoint")
    load_weights(model, state, pruned=pruned, field="checkpoint")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        export_onnx(model, data.example_input(2), out / "model.onnx", 18)
        ctx = Context(recipe=recipe, device=torch.device("cpu"), run_dir=out, data=data, models={}, specs={})
        ctx.add_artifact(Artifact("model.onnx", "student", "onnx", "fp32", out / "model.onnx", "export"))
        STAGES.get("quantize").model_validate({"kind": "quantize", "calibration_batches": 8}).apply(ctx)
        for name in ("model.onnx", "model.int8.onnx"):
            row = {"file": name, "size_bytes": (out / name).stat().st_size, "accuracy": onnx_accuracy(out / name, data)}
            for bs, iters in ((1, 300), (64, 60)):
                sess, x = session(out / name, threads=args.threads), batch_of(data, bs).numpy()
                row[f"bs{bs}"] = percentiles(time_calls(lambda s=sess, x=x: run(s, x), 20, iters), bs)
            rows.append(row)
    fp32, int8 = rows
    result = {
        "command": command(),
        "date": dt.date.today().isoformat(),
        "environment": environment(args.threads),
        "checkpoint": str(args.checkpoint),
        "pruned": pruned,
        "rows": rows,
        "speedup_bs1": fp32["bs1"]["p50_ms"] / int8["bs1"]["p50_ms"],
        "speedup_bs64": fp32["bs64"]["p50_ms"] / int8["bs64"]["p50_ms"],
    }
    md = [
        f"# INT8 vs FP32 ONNX: {args.name}",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {machine(result['environment'])}, {args.threads} threads  ",
        f"Date: {result['date']}",
        "",
        "| file | top-1 | size | p50 ms bs=1 | p99 ms bs=1 | p50 ms bs=64 | p99 ms bs=64 |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['file']} | {100 * r['accuracy']:.2f}% | {r['size_bytes'] / 1024:.1f} KB | "
            f"{r['bs1']['p50_ms']:.3f} | {r['bs1']['p99_ms']:.3f} | "
            f"{r['bs64']['p50_ms']:.3f} | {r['bs64']['p99_ms']:.3f} |"
            for r in rows
        ),
        "",
        f"INT8 speed-up: {result['speedup_bs1']:.2f}× at batch 1, {result['speedup_bs64']:.2f}× at batch 64.",
    ]
    save(f"int8_vs_fp32_{args.name}", result, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
