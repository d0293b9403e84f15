"""Does structured pruning buy latency in proportion to the MACs it removes? Measured, per model
and ratio, with ONNX Runtime on this CPU, dense and pruned timed side by side in one process.

    python benchmarks/prune_latency.py [--models resnet18,resnet50,mobilenet_v2] [--ratios 0.3,0.5,0.7]
                                       [--size 224] [--threads 2] [--iters 30] [--round-to 8]
                                       [--head-ratio 0.5]   # transformers: whole heads removed too

Random weights (latency does not depend on them), uniform L1 channel pruning through the prune
stage's code path (torch-pruning DepGraph), batch 1. For each point: MACs reduction (dense MACs /
pruned MACs), latency speedup (dense p50 / pruned p50) and their ratio, the "efficiency" (goal:
≥ 0.75). Writes results/prune_latency.{json,md} (prune_latency_round<N>.* with --round-to N,
…_heads<R> with --head-ratio R).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import command, machine, save

from compress.bench.measure import percentiles, time_calls
from compress.env import environment
from compress.models import build_model
from compress.onnx_utils import run, session
from compress.pruning.structured import StructuredOptions, count, prune_step
from compress.stages.export import export_onnx


def latency(path: Path, x: np.ndarray, threads: int, iters: int) -> dict[str, float]:
    sess = session(path, threads=threads)
    return percentiles(time_calls(lambda: run(sess, x), max(5, iters // 5), iters), 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,resnet50,mobilenet_v2")
    ap.add_argument("--ratios", default="0.3,0.5,0.7")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--round-to", type=int, default=None)
    ap.add_argument("--head-ratio", type=float, default=0.0)
    args = ap.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    torch.manual_seed(0)
    x = torch.randn(1, 3, args.size, args.size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            dense = build_model(f"torchvision:{name}", 1000, 3).eval()
            macs0, params0 = count(dense, x)
            export_onnx(dense, x, Path(tmp) / "dense.onnx", 18)
            base = latency(Path(tmp) / "dense.onnx", x.numpy(), args.threads, args.iters)
            rows.append({"model": name, "ratio": 0.0, "macs": macs0, "params": params0, "latency": base})
            print(f"{name} dense: {macs0 / 1e9:.2f} GMACs, p50 {base['p50_ms']:.2f} ms", flush=True)
            for r in ratios:
                model = build_model(f"torchvision:{name}", 1000, 3).eval()
                model.load_state_dict(dense.state_dict())
                prune_step(model, x, StructuredOptions(round_to=args.round_to, head_ratio=args.head_ratio), r, 1000)
                macs, params = count(model, x)
                path = Path(tmp) / f"{name}-{r}.onnx"
                export_onnx(model, x, path, 18)
                # the two files timed back to back, dense again, so drift on a shared machine shows
                lat = latency(path, x.numpy(), args.threads, args.iters)
                again = latency(Path(tmp) / "dense.onnx", x.numpy(), args.threads, args.iters)
                dense_p50 = (base["p50_ms"] + again["p50_ms"]) / 2
                row = {
                    "model": name,
                    "ratio": r,
                    "macs": macs,
                    "params": params,
                    "latency": lat,
                    "dense_p50_ms_here": again["p50_ms"],
                    "macs_reduction": macs0 / macs,
                    "speedup": dense_p50 / lat["p50_ms"],
                }
                row["efficiency"] = row["speedup"] / row["macs_reduction"]
                rows.append(row)
                print(f"  ratio {r}: MACs ÷{row['macs_reduction']:.2f}, latency ÷{row['speedup']:.2f}, "
                      f"efficiency {row['efficiency']:.2f}", flush=True)  # fmt: skip
    env = environment(args.threads)
    result = {
        "command": command(),
        "date": dt.date.today().isoformat(),
        "environment": env,
        "input": [1, 3, args.size, args.size],
        "rows": rows,
    }
    stem = f"prune_latency_round{args.round_to}" if args.round_to else "prune_latency"
    stem += f"_heads{args.head_ratio:g}" if args.head_ratio else ""
    md = [
        "# Structured pruning: latency speedup vs MACs reduction (ONNX Runtime, CPU)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {machine(env)}, {args.threads} threads, no GPU  ",
        f"Date: {result['date']}  ",
        f"Setup: torchvision models, random weights, 1000 classes, input 1×3×{args.size}×{args.size}, uniform L1 "
        f"channel pruning (classifier kept{', channels rounded to ' + str(args.round_to) if args.round_to else ''}"
        f"{f', {args.head_ratio:.0%} of the attention heads removed whole' if args.head_ratio else ''}), "
        f"ONNX opset 18, ORT p50 of {args.iters} runs; each pruned file's speedup is against the mean of the dense "
        "p50 measured at the start and right after it. Goal: efficiency (speedup ÷ MACs reduction) ≥ 0.75.",
        "",
        "| model | channels removed | GMACs | params | p50 ms | MACs reduction | latency speedup | efficiency |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        extra = (
            f"{r['macs_reduction']:.2f}× | {r['speedup']:.2f}× | {r['efficiency']:.2f}" if r["ratio"] else "– | – | –"
        )
        md.append(
            f"| {r['model']} | {r['ratio']:.0%} | {r['macs'] / 1e9:.3f} | {r['params'] / 1e6:.2f}M | "
            f"{r['latency']['p50_ms']:.2f} | {extra} |"
        )
    md.append("")
    save(stem, result, "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
