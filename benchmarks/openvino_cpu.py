"""ONNX Runtime vs OpenVINO on the CPU this runs on: one ONNX file, two runtimes (issue 23).

    python benchmarks/openvino_cpu.py [--models resnet20,resnet56] [--source runs/int8-isa]
                                      [--work runs/openvino-cpu] [--rounds 5] [--results benchmarks/results]

For CIFAR ResNet-20 and ResNet-56, the FP32 ONNX file that ``benchmarks/int8_isa.py`` trained and exported
(``<source>/<model>/model.onnx``: trained weights, so the agreement below means something; latency does not
depend on the values) and its INT8 file (``compress.quantize_onnx``: the quantize stage's QDQ, per-channel,
percentile calibration on 512 training images, ``scheme: auto`` = the fastest scheme ORT computes exactly on
this host) are each run by ONNX Runtime and by OpenVINO through ``compress.bench.runtimes``, the code
``compress bench --runtime onnxruntime,openvino`` times with.

* Agreement: top-1 of both runtimes on every test image, the share of images where their classes agree, and
  the largest logit difference (relative to the logits' scale).
* Latency: p50 at batch 1 and 64, on 1 and 2 threads, every (file, runtime, batch, threads) timed round-robin
  in one process (each round times every one of them, so drift on a shared machine hits all alike); an ORT
  session is opened per turn and dropped after it (no idle pool spinning), OpenVINO's compiled model is
  kept. Reported: the median of all samples and the spread of the rounds' p50s (max-min over median).

Resumable: the INT8 files, the agreement numbers and every finished round are kept in ``--work``
(state.json); rerunning the same command continues. Writes ``<results>/openvino_cpu_<isa kind>.{json,md}``
(``common.isa_kind``: one pair per class of CPU). A timing run must be alone on the machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

import common
import numpy as np
from common import ROOT, isa_kind, machine, stamp

CONFIGS = ((1, 1), (1, 2), (64, 1), (64, 2))  # (batch, threads)
RUNTIMES = ("onnxruntime", "openvino")
WARMUP = 5
CALIBRATION = {"batches": 16, "batch_size": 32}  # 512 training images, as the quantize stage's default


def prepare(models: list[str], source: Path, work: Path, state: dict[str, Any]) -> tuple[dict[str, Path], Any]:
    """{(model, precision) key: ONNX file}, quantizing each FP32 file once (kept in ``work``), and the data."""
    from compress.onnx_api import quantize_onnx
    from compress.recipe import read_yaml, validate_data

    files, data = {}, None
    for model in models:
        fp32 = source / model / "model.onnx"
        if not fp32.is_file():
            raise SystemExit(f"openvino_cpu: no {fp32}; run python benchmarks/int8_isa.py --train-only first")
        # The run's data block (its stages may predate today's recipe schema; the data is what counts).
        data = data or validate_data(read_yaml(fp32.parent / "recipe.resolved.yaml")["data"]).open()
        int8 = work / model / "model.int8.onnx"
        if not int8.is_file() or model not in state.get("quantized", {}):
            int8.parent.mkdir(parents=True, exist_ok=True)
            q = quantize_onnx(fp32, data, out=int8, **CALIBRATION)
            how = {"scheme": q.scheme, "reason": q.reason, "images": q.calibration_images, "exact_here": q.exact_here}
            state.setdefault("quantized", {})[model] = how
            print(f"{model}: INT8 ({q.scheme}) written to {int8}", flush=True)
        files[f"{model}/fp32"], files[f"{model}/int8"] = fp32, int8
    return files, data


def agreement(path: Path, data: Any, images: int | None) -> dict[str, float]:
    """Top-1 of both runtimes on the test split, their argmax agreement and largest relative logit gap."""
    from compress.bench import runtimes
    from compress.metadata import feeder
    from compress.onnx_utils import session

    feed = feeder(session(path), data)
    run = {rt: runtimes.get(rt).runner(path, 2) for rt in RUNTIMES}
    logits: dict[str, list[np.ndarray]] = {rt: [] for rt in RUNTIMES}
    labels = []
    for x, y in data.raw_batches("test", images, 500):
        batch = feed(x)
        for rt in RUNTIMES:
            logits[rt].append(run[rt](batch))
        labels.append(y.numpy())
    y = np.concatenate(labels)
    ort, ov = (np.concatenate(logits[rt]) for rt in RUNTIMES)
    return {
        "images": len(y),
        "top1_onnxruntime": float((ort.argmax(1) == y).mean()),
        "top1_openvino": float((ov.argmax(1) == y).mean()),
        "argmax_agreement": float((ort.argmax(1) == ov.argmax(1)).mean()),
        "max_abs_diff_rel": float(np.abs(ort - ov).max() / np.abs(ort).max()),
    }


def time_round(files: dict[str, Path], feeds: dict[tuple[str, int], np.ndarray], iters: dict[int, int]):
    """One round: every (file, runtime, batch, threads) timed once, in that order."""
    from compress.bench import runtimes

    out: dict[str, list[float]] = {}
    for key, path in files.items():
        for rt in RUNTIMES:
            for bs, threads in CONFIGS:
                samples, used = runtimes.timed(path, feeds[key, bs], rt, threads, WARMUP, iters[bs])
                assert used == threads, f"{key} {rt}: asked for {threads} threads, runs {used}"
                out[f"{key}|{rt}|{bs}|{threads}"] = samples
    return out


def summarize(rounds: list[dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Per (file, runtime, batch, threads): median of all samples, and the spread of the rounds' p50s."""
    out = {}
    for cell in rounds[0]:
        per_round = [float(np.median(r[cell])) for r in rounds]
        p50 = float(np.median(np.concatenate([r[cell] for r in rounds])))
        out[cell] = {"p50_ms": p50, "spread": (max(per_round) - min(per_round)) / p50, "rounds": len(rounds)}
    return out


def markdown(result: dict[str, Any]) -> str:
    env, lat = result["environment"], result["latency"]
    q = next(iter(result["quantized"].values()), {})
    lines = [
        f"# ONNX Runtime vs OpenVINO on {env['isa']}: one ONNX file, two runtimes",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {machine(env)}, {env['cpu_count']} cores, no GPU; onnxruntime {env['onnxruntime']}, "
        f"openvino {env['openvino']}  ",
        f"Date: {result['date'][:10]}  ",
        "Files: each model's FP32 ONNX from `benchmarks/int8_isa.py`'s trained runs (trained weights; "
        f"{', '.join(result['weights'])}) and its INT8 QDQ file from `compress.quantize_onnx` (scheme "
        f"`{q.get('scheme', '?')}`: {q.get('reason', '?')}; percentile calibration on {q.get('images', '?')} "
        "training images). Both runtimes run the same files through `compress.bench.runtimes` (ORT: "
        "`onnx_utils.session`, full optimization; OpenVINO: CPU plugin reading the ONNX file, "
        "`INFERENCE_NUM_THREADS`, `PERFORMANCE_HINT LATENCY`, `INFERENCE_PRECISION_HINT f32`, static batch). "
        f"p50 = median of all samples of {result['rounds']} round-robin rounds ({result['iters']['1']} "
        f"runs per round at batch 1, {result['iters']['64']} at 64, {WARMUP} warm-up); ± = the rounds' "
        "p50 spread (max-min over median). Real test images as input.",
        "",
        "## Agreement on the test split",
        "",
        "| model | precision | ORT top-1 | OpenVINO top-1 | same class | max logit Δ (of scale) |",
        "|---|---|---|---|---|---|",
    ]
    for key, a in result["agreement"].items():
        model, precision = key.split("/")
        lines.append(
            f"| {model} | {precision} | {100 * a['top1_onnxruntime']:.2f}% | {100 * a['top1_openvino']:.2f}% | "
            f"{100 * a['argmax_agreement']:.2f}% of {a['images']} | {a['max_abs_diff_rel']:.1e} |"
        )
    lines += [
        "",
        "## Latency (p50 ms)",
        "",
        "| model | precision | batch | threads | ORT | OpenVINO | ORT / OpenVINO | faster |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in result["files"]:
        model, precision = key.split("/")
        for bs, threads in CONFIGS:
            o, v = (lat[f"{key}|{rt}|{bs}|{threads}"] for rt in RUNTIMES)
            ratio = o["p50_ms"] / v["p50_ms"]
            lines.append(
                f"| {model} | {precision} | {bs} | {threads} | {o['p50_ms']:.3f} ±{100 * o['spread']:.0f}% | "
                f"{v['p50_ms']:.3f} ±{100 * v['spread']:.0f}% | {ratio:.2f}× | "
                f"{'OpenVINO' if ratio > 1 else 'ORT'} |"
            )
    lines += ["", "## INT8 vs FP32 on each runtime (FP32 p50 / INT8 p50)", ""]
    lines += ["| model | batch | threads | ORT | OpenVINO |", "|---|---|---|---|---|"]
    for model in dict.fromkeys(k.split("/")[0] for k in result["files"]):
        for bs, threads in CONFIGS:
            cells = [
                lat[f"{model}/fp32|{rt}|{bs}|{threads}"]["p50_ms"] / lat[f"{model}/int8|{rt}|{bs}|{threads}"]["p50_ms"]
                for rt in RUNTIMES
            ]
            lines.append(f"| {model} | {bs} | {threads} | {cells[0]:.2f}× | {cells[1]:.2f}× |")
    lines += ["", "## Fastest runtime for the INT8 file (each at its best thread count)", ""]
    lines += [f"- {line}" for line in result["fastest"]] + [""]
    return "\n".join(lines)


def fastest(files: list[str], lat: dict[str, dict[str, float]]) -> list[str]:
    """What ``compress bench`` says for the deployable (INT8) student, per model and batch size."""
    out = []
    for key in (k for k in files if k.endswith("/int8")):
        for bs in sorted({b for b, _ in CONFIGS}):
            best = {
                rt: min(((lat[f"{key}|{rt}|{bs}|{t}"]["p50_ms"], t) for b, t in CONFIGS if b == bs)) for rt in RUNTIMES
            }
            ranked = sorted(best.items(), key=lambda kv: kv[1][0])
            cells = " < ".join(f"{rt} {ms:.3f} ms ({t} thread{'s' * (t != 1)})" for rt, (ms, t) in ranked)
            out.append(f"{key.split('/')[0]}, batch {bs}: {cells}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,resnet56")
    ap.add_argument("--source", default="runs/int8-isa", help="where benchmarks/int8_isa.py left its trained runs")
    ap.add_argument("--work", default="runs/openvino-cpu", help="INT8 files and the resumable state")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, nargs=2, default=[100, 10], metavar=("BS1", "BS64"), help="runs per round")
    ap.add_argument("--images", type=int, default=None, help="test images for the agreement (default: all)")
    ap.add_argument("--results", default=str(common.RESULTS), help="where the JSON and Markdown go")
    args = ap.parse_args()
    from compress.bench import runtimes

    why = runtimes.RUNTIMES.get("openvino").available()
    if why:
        print(f"openvino_cpu: {why}", file=sys.stderr)
        return 2
    work, source = (ROOT / args.work).resolve(), (ROOT / args.source).resolve()
    work.mkdir(parents=True, exist_ok=True)
    state_file = work / "state.json"
    settings = {"models": args.models, "iters": args.iters, "images": args.images}
    state: dict[str, Any] = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if state.get("settings") != settings:  # another configuration: its rounds do not mix with these
        state = {"settings": settings, "started": dt.datetime.now(dt.UTC).isoformat(), "rounds": [], **{
            k: v for k, v in state.items() if k == "quantized"}}  # fmt: skip
    save_state = lambda: state_file.write_text(json.dumps(state) + "\n")  # noqa: E731
    files, data = prepare(args.models.split(","), source, work, state)
    save_state()
    state.setdefault("agreement", {})
    for key, path in files.items():
        if key not in state["agreement"]:
            state["agreement"][key] = agreement(path, data, args.images)
            save_state()
            a = state["agreement"][key]
            print(f"{key}: same class on {100 * a['argmax_agreement']:.2f}% (max Δ {a['max_abs_diff_rel']:.1e})")
    from compress.metadata import feeder
    from compress.onnx_utils import session

    x = {bs: next(data.raw_batches("test", bs, bs))[0] for bs in {b for b, _ in CONFIGS}}
    feeds = {(k, bs): feeder(session(p), data)(x[bs]) for k, p in files.items() for bs in x}
    iters = {1: args.iters[0], 64: args.iters[1]}
    while len(state["rounds"]) < args.rounds:
        state["rounds"].append(time_round(files, feeds, iters))
        save_state()
        print(f"round {len(state['rounds'])}/{args.rounds} done", flush=True)
    started = dt.datetime.fromisoformat(state["started"])
    lat = summarize(state["rounds"])
    result = {
        **stamp(started, 2),
        "rounds": args.rounds,
        "iters": {"1": iters[1], "64": iters[64]},
        "files": {k: str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for k, p in files.items()},
        "weights": [f"{args.source}/{m}/checkpoints/01-train/student.pt" for m in args.models.split(",")],
        "quantized": state.get("quantized", {}),
        "agreement": state["agreement"],
        "latency": lat,
        "fastest": fastest(list(files), lat),
    }
    common.RESULTS = Path(args.results)
    common.save(f"openvino_cpu_{isa_kind(result['environment'])}", result, markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
