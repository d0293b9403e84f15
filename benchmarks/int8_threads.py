"""Where a second thread helps at batch 1: ONNX Runtime's profiler, FP32 vs INT8, 1 vs 2 threads.

    python benchmarks/int8_threads.py [--models resnet20,resnet56] [--work runs/quant-peers] [--iters 400]

For each model, the FP32 and INT8 (our quantize stage) files that benchmarks/quant_peers.py wrote
are profiled at batch 1 on one and on two threads (ORT's per-node kernel times, summed per op type,
averaged over the timed runs), and timed without the profiler round-robin as everywhere else. The
question it answers: why INT8 is ≥ 2× FP32 on one thread but not on two (issue 6). The profiler adds
a few µs per node, so per-op numbers are for comparing the two thread counts, not absolute latency.
Writes benchmarks/results/int8_threads.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from common import ROOT, machine, random_input, save, side_by_side, stamp

WARMUP = 20


def profile(path: Path, threads: int, iters: int, workdir: Path) -> dict[str, Any]:
    """Mean µs per run of each op type's kernels, and of the whole run, under ORT's profiler."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.enable_profiling, opts.profile_file_prefix = True, str(workdir / f"{path.stem}-{threads}")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    x = random_input(inp, 1, np.random.default_rng(0))
    for _ in range(WARMUP + iters):
        sess.run(None, {inp.name: x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[WARMUP:]
    start = runs[0]["ts"]
    per_op: Counter = Counter()
    nodes: dict[str, set[str]] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            op = e["args"]["op_name"]
            per_op[op] += e["dur"]
            nodes.setdefault(op, set()).add(e["name"])
    return {
        "run_us": sum(r["dur"] for r in runs) / len(runs),
        "ops": {op: {"nodes": len(nodes[op]), "us": us / len(runs)} for op, us in per_op.most_common()},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,resnet56")
    ap.add_argument("--work", default="runs/quant-peers", help="where benchmarks/quant_peers.py left its runs")
    ap.add_argument("--iters", type=int, default=400, help="profiled runs per file and thread count")
    args = ap.parse_args()
    started = dt.datetime.now(dt.UTC)
    files = {}
    for model in args.models.split(","):
        for precision, name in (("fp32", "model.onnx"), ("int8", "model.int8.onnx")):
            path = ROOT / args.work / model / name
            if not path.is_file():
                print(f"int8_threads: no {path}; run benchmarks/quant_peers.py first", file=sys.stderr)
                return 2
            files[model, precision] = path
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for (model, precision), path in files.items():
            prof = {t: profile(path, t, args.iters, Path(tmp)) for t in (1, 2)}
            rows.append({"model": model, "precision": precision, "path": str(path.relative_to(ROOT)), "profile": prof})
            print(f"{model} {precision}: {prof[1]['run_us']:.0f} -> {prof[2]['run_us']:.0f} µs profiled", flush=True)
    timed = side_by_side({f"{r['model']}/{r['precision']}": ROOT / r["path"] for r in rows}, threads=2)
    for r in rows:
        r["p50_ms_bs1"] = timed[f"{r['model']}/{r['precision']}"]["p50_ms_bs1"]
        r["p50_ms_bs1_1thread"] = timed[f"{r['model']}/{r['precision']}"]["p50_ms_bs1_1thread"]
    write(rows, args, started)
    return 0


def write(rows: list[dict[str, Any]], args: argparse.Namespace, started: dt.datetime) -> None:
    result = {**stamp(started, 2), "iters": args.iters, "rows": rows}
    env = result["environment"]
    md = [
        "# Batch 1 on one and two threads: where the second thread helps FP32 and INT8 (ONNX Runtime, CPU)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {machine(env)}, 2 cores, no GPU; onnxruntime {env['onnxruntime']}  ",
        f"Date: {result['date']}  ",
        f"Per op type: ORT profiler kernel time per run (mean of {args.iters} runs after {WARMUP} warm-up), "
        "summed over that type's nodes; the profiler adds a few µs per node, so compare columns, not totals "
        "with the p50s. p50: the same files timed without the profiler, round-robin, fresh session per turn.",
        "",
    ]
    by_model: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["precision"]] = r
    for model, pair in by_model.items():
        fp32, int8 = pair["fp32"], pair["int8"]
        md += [
            f"## {model}",
            "",
            "| | FP32 | INT8 | INT8 vs FP32 |",
            "|---|---|---|---|",
            f"| p50 ms, 1 thread | {fp32['p50_ms_bs1_1thread']:.3f} | {int8['p50_ms_bs1_1thread']:.3f} | "
            f"{fp32['p50_ms_bs1_1thread'] / int8['p50_ms_bs1_1thread']:.2f}× |",
            f"| p50 ms, 2 threads | {fp32['p50_ms_bs1']:.3f} | {int8['p50_ms_bs1']:.3f} | "
            f"{fp32['p50_ms_bs1'] / int8['p50_ms_bs1']:.2f}× |",
            f"| 2nd thread speed-up | {fp32['p50_ms_bs1_1thread'] / fp32['p50_ms_bs1']:.2f}× | "
            f"{int8['p50_ms_bs1_1thread'] / int8['p50_ms_bs1']:.2f}× | |",
            "",
            "| file | op type | nodes | µs/run, 1 thread | µs/run, 2 threads | 2nd thread speed-up |",
            "|---|---|---|---|---|---|",
        ]
        for precision, r in pair.items():
            one, two = r["profile"][1], r["profile"][2]
            for op, v in one["ops"].items():
                t2 = two["ops"].get(op, {}).get("us", float("nan"))
                md.append(f"| {precision} | {op} | {v['nodes']} | {v['us']:.1f} | {t2:.1f} | {v['us'] / t2:.2f}× |")
            k1, k2 = (sum(v["us"] for v in p["ops"].values()) for p in (one, two))
            md.append(f"| {precision} | **all kernels** | | {k1:.1f} | {k2:.1f} | {k1 / k2:.2f}× |")
            md.append(
                f"| {precision} | whole run (profiled) | | {one['run_us']:.1f} | {two['run_us']:.1f} | "
                f"{one['run_us'] / two['run_us']:.2f}× |"
            )
        md.append("")
    save("int8_threads", result, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    sys.exit(main())
