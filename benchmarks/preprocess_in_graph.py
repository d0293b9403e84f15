"""What preprocessing inside the ONNX graph costs, and that it changes no answer: CIFAR-10 ResNet-20.

    python benchmarks/preprocess_in_graph.py [--checkpoint STUDENT.pt] [--train-epochs 3]

Without --checkpoint, first trains a ResNet-20 for --train-epochs epochs with compress itself
(runs/preprocess-bench), so that top-1 means something. Then exports that one model three ways:
float32 NCHW input (normalization in numpy, outside the graph: the old contract), uint8 NHWC and
uint8 NCHW with scaling/normalization inside the graph (the default), quantizes each to INT8 with
the quantize stage's defaults, and measures every file the same way: top-1 on the 10k test images
fed as the metadata says, ORT-only latency, and end-to-end latency from uint8 NHWC pixels (what a
deployer holds after decoding images) including any numpy work. Writes
results/preprocess_in_graph.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from common import ROOT, command, save

from compress import metadata
from compress.bench.env import environment
from compress.bench.measure import onnx_accuracy, percentiles, time_calls
from compress.checkpoint import load_weights, read_checkpoint
from compress.context import Artifact, Context
from compress.deploy import Predictor
from compress.models import build_model
from compress.pipeline import load_data
from compress.recipe import load_recipe
from compress.stages import STAGES
from compress.stages.export import InGraphPreprocess, export_onnx

VARIANTS = {  # name: (preprocess_in_graph, layout)
    "float32_nchw_numpy_prep": (False, "nchw"),
    "uint8_nhwc_in_graph": (True, "nhwc"),
    "uint8_nchw_in_graph": (True, "nchw"),
}


def train(root: str, epochs: int, out: Path) -> Path:
    cmd = [
        "compress", "run", "recipes/cifar_resnet.yaml", "--out", str(out), "--overwrite", "--quiet",
        "--set", f"data.root={root}", "--set", "teacher=null", "--set", "benchmark.iters=5",
        "--set", "benchmark.warmup=1", "--set", "benchmark.batch_sizes=[1]",
        "--set", f"stages=[{{kind: train, target: student, epochs: {epochs}, lr: 0.1}}]",
    ]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True)
    return out / "checkpoints" / "01-train" / "student.pt"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--train-epochs", type=int, default=3)
    ap.add_argument("--root", default="../shared/data/cifar10-jpeg.tar.gz")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "preprocess-bench")
    args = ap.parse_args()
    ckpt = args.checkpoint or train(args.root, args.train_epochs, args.out)
    recipe = load_recipe(ROOT / "recipes" / "cifar_resnet.yaml", [f"data.root={args.root}"])
    data = load_data(recipe)
    model = build_model(args.model, data.num_classes, data.channels)
    state, pruned = read_checkpoint(ckpt, "student", "checkpoint")
    load_weights(model, state, pruned=pruned, field="checkpoint")
    model.eval()
    files_dir = args.out / "variants"
    rows = []
    for name, (in_graph, layout) in VARIANTS.items():
        info = metadata.model_info(data, preprocess_in_graph=in_graph, layout=layout)
        run_dir = files_dir / name
        fp32 = run_dir / "model.onnx"
        example = torch.from_numpy(info.prepare(data.test_x[:2].numpy(), layout="nchw"))
        export_onnx(InGraphPreprocess(model, info), example, fp32, 18, info.input_name)
        metadata.update(fp32, info.to_metadata(), strip_node_debug=True)
        ctx = Context(recipe=recipe, device=torch.device("cpu"), run_dir=run_dir, data=data, models={}, specs={})
        ctx.add_artifact(Artifact("model.onnx", "student", "onnx", "fp32", fp32, "export"))
        STAGES.get("quantize").model_validate({"kind": "quantize", "calibration_batches": 8}).apply(ctx)
        for precision, path in (("fp32", fp32), ("int8", run_dir / "model.int8.onnx")):
            pred = Predictor(path, threads=args.threads)
            row = {
                "variant": name,
                "precision": precision,
                "input": info.describe(),
                "accuracy": onnx_accuracy(path, data),
            }
            for bs, iters in ((1, 300), (64, 60)):
                nhwc = np.ascontiguousarray(data.test_x[:bs].permute(0, 2, 3, 1).numpy())
                feed = {info.input_name: info.prepare(nhwc)}
                ort_only = time_calls(lambda p=pred, f=feed: p.session.run(None, f), 20, iters)
                end_to_end = time_calls(lambda p=pred, x=nhwc: p.logits(x), 20, iters)
                row[f"bs{bs}_ort"] = percentiles(ort_only, bs)
                row[f"bs{bs}_from_pixels"] = percentiles(end_to_end, bs)
            rows.append(row)
            print(name, precision, f"{row['accuracy']:.4f}", f"{row['bs1_from_pixels']['p50_ms']:.3f} ms", flush=True)
    result = {
        "command": command(),
        "date": dt.date.today().isoformat(),
        "environment": environment(args.threads),
        "checkpoint": str(ckpt),
        "train_epochs": None if args.checkpoint else args.train_epochs,
        "rows": rows,
    }
    env = result["environment"]
    md = [
        "# Preprocessing inside the ONNX graph: cost and parity (CIFAR-10 ResNet-20)",
        "",
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}; {env['cpu']}, {args.threads} threads, onnxruntime {env['onnxruntime']}, "
        f"torch {env['torch']}  ",
        f"Model: {args.model} from `{ckpt}`"
        + (
            f" ({args.train_epochs} training epochs: a short schedule, top-1 is for parity, not quality)"
            if not args.checkpoint
            else ""
        ),
        "",
        "Top-1 on the 10,000 CIFAR-10 test images, each file fed as its metadata says. Latency p50 in ms: "
        "*ORT* is `session.run` on a ready input; *from pixels* starts from uint8 NHWC pixels and includes "
        "the numpy transpose/normalization the float32 model needs outside the graph.",
        "",
        "| input | precision | top-1 | bs=1 ORT | bs=1 from pixels | bs=64 ORT | bs=64 from pixels |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['variant']} | {r['precision']} | {100 * r['accuracy']:.2f}% | {r['bs1_ort']['p50_ms']:.3f} | "
            f"{r['bs1_from_pixels']['p50_ms']:.3f} | {r['bs64_ort']['p50_ms']:.3f} | "
            f"{r['bs64_from_pixels']['p50_ms']:.3f} |"
        )
    save("preprocess_in_graph", result, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
