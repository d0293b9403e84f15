"""What preprocessing inside the ONNX graph costs, and that it changes no answer: CIFAR-10 ResNet-20.

    python benchmarks/preprocess_in_graph.py [--checkpoint STUDENT.pt] [--train-epochs 3] [--rounds 5]

Without --checkpoint, first trains a ResNet-20 for --train-epochs epochs with compress itself
(runs/preprocess-bench), so that top-1 means something. Then exports that one model four ways:
float32 NCHW input (normalization in numpy, outside the graph: the old contract), uint8 NHWC and
uint8 NCHW with scaling/normalization inside the graph (NHWC is the default), and uint8 NHWC the way
the export did it before 2026-11-30 (permute to NCHW first, then normalize: in INT8 graphs ORT's
transpose optimizer moved that normalization back to NHWC, one 3-value broadcast span per pixel).
Each is quantized to INT8 with the quantize stage's defaults, and every file is measured the same
way: top-1 on the 10k test images fed as the metadata says, ORT-only latency, and end-to-end latency
from uint8 NHWC pixels (what a deployer holds after decoding images) including any numpy work.
Latency is timed round-robin (every round times every file, each turn in a fresh session), at
--threads and at one thread, so drift on a shared machine hits all rows alike. Writes
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
from common import ROOT, save, stamp

from compress import metadata
from compress.bench.measure import onnx_accuracy, percentiles, time_calls
from compress.checkpoint import load_weights, read_checkpoint
from compress.context import Artifact, Context
from compress.deploy import Predictor
from compress.models import build_model
from compress.pipeline import load_data
from compress.recipe import load_recipe
from compress.stages import STAGES
from compress.stages.export import InGraphPreprocess, export_onnx


class PermuteFirst(InGraphPreprocess):
    """The export before 2026-11-30: NHWC pixels permuted to NCHW, then normalized per channel."""

    def __init__(self, model, info) -> None:
        super().__init__(model, info)
        self.mean = torch.tensor(info.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(info.std, dtype=torch.float32).view(1, -1, 1, 1)

    def forward(self, images):
        return self.model(self._normalize(images.permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format)))


VARIANTS = {  # name: (preprocess_in_graph, layout, wrapper)
    "float32_nchw_numpy_prep": (False, "nchw", InGraphPreprocess),
    "uint8_nhwc_in_graph": (True, "nhwc", InGraphPreprocess),
    "uint8_nchw_in_graph": (True, "nchw", InGraphPreprocess),
    "uint8_nhwc_in_graph_permute_first": (True, "nhwc", PermuteFirst),
}
CONFIGS = ((1, None, 300), (1, 1, 300), (64, None, 30))  # batch, threads (None: --threads), timed calls per turn


def train(root: str, epochs: int, out: Path) -> Path:
    cmd = [
        "compress", "run", "recipes/cifar_resnet.yaml", "--out", str(out), "--overwrite", "--quiet",
        "--set", f"data.root={root}", "--set", "teacher=null", "--set", "benchmark.iters=5",
        "--set", "benchmark.warmup=1", "--set", "benchmark.batch_sizes=[1]",
        "--set", f"stages=[{{kind: train, target: student, epochs: {epochs}, optim: {{lr: 0.1}}}}]",
    ]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True)
    return out / "checkpoints" / "01-train" / "student.pt"


def timed(path: Path, threads: int, bs: int, pixels: np.ndarray, iters: int) -> tuple[list[float], list[float]]:
    """ORT-only and from-pixels samples (seconds) in a fresh session, closed on return."""
    pred = Predictor(path, threads=threads)
    nhwc = np.ascontiguousarray(pixels[:bs])
    feed = {pred.info.input_name: pred.info.prepare(nhwc)}
    ort_only = time_calls(lambda: pred.session.run(None, feed), 20, iters)
    return ort_only, time_calls(lambda: pred.logits(nhwc), 20, iters)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--train-epochs", type=int, default=3)
    ap.add_argument("--root", default="../shared/data/cifar10-jpeg.tar.gz")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="round-robin timing rounds")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "preprocess-bench")
    args = ap.parse_args()
    started = dt.datetime.now(dt.UTC)
    ckpt = args.checkpoint or train(args.root, args.train_epochs, args.out)
    recipe = load_recipe(ROOT / "recipes" / "cifar_resnet.yaml", [f"data.root={args.root}"])
    data = load_data(recipe)
    model = build_model(args.model, data.num_classes, data.channels)
    state, pruned = read_checkpoint(ckpt, "student", "checkpoint")
    load_weights(model, state, pruned=pruned, field="checkpoint")
    model.eval()
    rows, files = [], {}
    for name, (in_graph, layout, wrapper) in VARIANTS.items():
        info = metadata.model_info(data, preprocess_in_graph=in_graph, layout=layout)
        run_dir = args.out / "variants" / name
        fp32 = run_dir / "model.onnx"
        example = torch.from_numpy(info.prepare(data.test_x[:2].numpy(), layout="nchw"))
        export_onnx(wrapper(model, info), example, fp32, 18, info.input_name)
        metadata.update(fp32, info.to_metadata(), strip_node_debug=True)
        ctx = Context(recipe=recipe, device=torch.device("cpu"), run_dir=run_dir, data=data, models={}, specs={})
        ctx.add_artifact(Artifact("model.onnx", "student", "onnx", "fp32", fp32, "export"))
        STAGES.get("quantize").model_validate({"kind": "quantize", "calibration_batches": 8}).apply(ctx)
        for precision, path in (("fp32", fp32), ("int8", run_dir / "model.int8.onnx")):
            rows.append({"variant": name, "precision": precision, "input": info.describe()})
            rows[-1]["accuracy"] = onnx_accuracy(path, data)
            files[name, precision] = path
            print(name, precision, f"{rows[-1]['accuracy']:.4f}", flush=True)
    pixels = data.test_x[:64].permute(0, 2, 3, 1).numpy()
    samples: dict = {key: {} for key in files}  # file -> (batch, threads, "ort" | "from_pixels") -> seconds
    for _ in range(args.rounds):
        for key, path in files.items():
            for bs, threads, iters in CONFIGS:
                t = threads or args.threads
                for what, got in zip(("ort", "from_pixels"), timed(path, t, bs, pixels, iters), strict=True):
                    samples[key].setdefault((bs, t, what), []).extend(got)
    for r in rows:
        for (bs, t, what), got in samples[r["variant"], r["precision"]].items():
            r[f"bs{bs}_{t}t_{what}"] = percentiles(got, bs)
    result = {**stamp(started, args.threads), "checkpoint": str(ckpt), "rounds": args.rounds, "rows": rows}
    result["train_epochs"] = None if args.checkpoint else args.train_epochs
    env, t = result["environment"], args.threads
    cols = [
        ("bs1", t, "ort"),
        ("bs1", t, "from_pixels"),
        ("bs1", 1, "ort"),
        ("bs64", t, "ort"),
        ("bs64", t, "from_pixels"),
    ]
    md = [
        "# Preprocessing inside the ONNX graph: cost and parity (CIFAR-10 ResNet-20)",
        "",
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}; {env['cpu']}, onnxruntime {env['onnxruntime']}, torch {env['torch']}  ",
        f"Model: {args.model} from `{ckpt}`"
        + (
            f" ({args.train_epochs} training epochs: a short schedule, top-1 is for parity, not quality)"
            if not args.checkpoint
            else ""
        ),
        "",
        "Top-1 on the 10,000 CIFAR-10 test images, each file fed as its metadata says. Latency p50 in ms over "
        f"{args.rounds} round-robin rounds (each turn a fresh session): *ORT* is `session.run` on a ready input; "
        "*pixels* starts from uint8 NHWC pixels and includes the numpy transpose/normalization the float32 model "
        "needs outside the graph. `permute_first` is the NHWC export before 2026-11-30.",
        "",
        "| input | precision | top-1 | "
        + " | ".join(f"{b.replace('bs', 'bs=')} {w.replace('from_', '')} {n}t" for b, n, w in cols)
        + " |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    for r in rows:
        cells = " | ".join(f"{r[f'{b}_{n}t_{w}']['p50_ms']:.3f}" for b, n, w in cols)
        md.append(f"| {r['variant']} | {r['precision']} | {100 * r['accuracy']:.2f}% | {cells} |")
    save("preprocess_in_graph", result, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
