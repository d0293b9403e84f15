"""INT8 schemes on the CPU this runs on: top-1 and latency of FP32 and of every INT8 scheme
(U8S8, U8S8 + reduce_range, S8S8, U8U8, and ``auto``) for CIFAR ResNet-20 / ResNet-56 and the
quickstart's digits student, labelled with the host's instruction sets.

    python benchmarks/int8_isa.py [--root ../shared/data/cifar10-jpeg.tar.gz] [--work runs/int8-isa]
                                  [--models resnet20,resnet56,digits] [--rounds 5] [--train-only]

The CIFAR models are trained here on a short schedule (``compress run`` of a recipe written under
``--work``: finished runs are reused, interrupted ones resumed), or taken from ``--checkpoint-dir``
(distill_cifar's runs). The digits student is the quickstart recipe's pruned student. Every scheme
quantizes the same FP32 file from the same calibration images with the quantize stage's code;
latency is timed round-robin in one process (a fresh ORT session per turn) at batch 1 and 32, on 1
and 2 threads. Targets on any x86 host: ``auto`` loses <= 0.3 pt top-1 and is faster than FP32 at
batch 32. Results: benchmarks/results/int8_isa_<kind>.{json,md}, one pair per class of CPU
(``common.isa_kind``: avx2, avx512_vnni, ...), so runs on different hosts sit side by side.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from common import ROOT, isa_kind, machine, save, side_by_side, stamp
from distill_cifar import run  # reuse-or-resume one compress run

OPTIM = {"lr": 0.1, "weight_decay": 5.0e-4, "schedule": "cosine", "warmup_epochs": 1}
BENCH = {"batch_sizes": [1], "warmup": 2, "iters": 10, "devices": ["cpu"], "torch_snapshots": False}
EPOCHS = {"resnet20": 8, "resnet56": 4}


def cifar_recipe(model: str, root: str, epochs: int) -> dict[str, Any]:
    return {
        "name": f"int8_isa_{model}",
        "seed": 0,
        "data": {"name": "cifar10", "root": root, "batch_size": 128, "eval_batch_size": 500},
        "student": {"model": model},
        "stages": [{"kind": "train", "epochs": epochs, "optim": OPTIM}, {"kind": "export", "opset": 18}],
        "benchmark": BENCH,
    }


def digits_recipe() -> dict[str, Any]:
    raw = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    raw["stages"] = [s for s in raw["stages"] if s["kind"] not in ("quantize", "qat")]
    raw["benchmark"] = BENCH
    return raw


def train(work: Path, models: list[str], root: str) -> dict[str, Path]:
    """The FP32 ONNX file of each model, trained (or reused) by compress itself."""
    files = {}
    for m in models:
        raw = digits_recipe() if m == "digits" else cifar_recipe(m, root, EPOCHS[m])
        run(work, m, raw)
        files[m] = work / m / "model.onnx"
    return files


SCHEMES = ("u8s8", "u8s8_reduce_range", "s8s8", "u8u8")
CONFIGS = ((1, 1, 40, "bs1_t1"), (1, 2, 40, "bs1_t2"), (32, 1, 6, "bs32_t1"), (32, 2, 6, "bs32_t2"))
CALIBRATION = {"batches": 16, "batch_size": 32}  # 512 training images, as quant_peers
MODE = "+ x64quantprecision"  # row suffix: the same file in ORT's precision mode


def quantize_all(name: str, fp32: Path, out: Path) -> tuple[dict[str, Path], dict[str, Any], Any]:
    """The FP32 file quantized with every scheme (ptq.static, the quantize stage's defaults:
    QDQ, per-channel, percentile 99.999), one calibration shared through ORT's cache."""
    from compress import metadata
    from compress.onnx_utils import session
    from compress.pipeline import load_data
    from compress.quantization import ptq
    from compress.quantization.calibration import BatchReader
    from compress.quantization.schemes import SCHEMES as REGISTRY
    from compress.quantization.schemes import choose, probe
    from compress.recipe import load_recipe

    data = load_data(load_recipe(fp32.parent / "recipe.resolved.yaml"))
    sess = session(fp32)
    reader = BatchReader(data, sess.get_inputs()[0].name, CALIBRATION["batches"], CALIBRATION["batch_size"],
                         metadata.feeder(sess, data))  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    pre, cache = out / "pre.onnx", out / "calibration.json"
    ptq.preprocess(fp32, pre)
    files = {"fp32": fp32}
    for scheme in SCHEMES:
        dst = out / f"{scheme}.onnx"
        if not dst.is_file():
            ptq.static(pre, out / "raw.onnx", reader, method="percentile", scheme=scheme, cache=cache)
            props = metadata.read(fp32) | {"precision": "int8"} | REGISTRY.get(scheme).metadata()
            metadata.update(out / "raw.onnx", props, dest=dst)
            (out / "raw.onnx").unlink()
        files[scheme] = dst
        print(f"{name}: {scheme} quantized", flush=True)
    for scheme in SCHEMES:  # what a full-range file gets where it saturates: ORT's precision mode
        if not probe(scheme).exact:
            files[f"{scheme} {MODE}"] = files[scheme]
    auto, why, _ = choose("auto")
    info = {
        "auto": auto.name,
        "auto_reason": why,
        "probe": {
            s: {
                "exact": probe(s).exact,
                "worst_error": round(probe(s).worst_error, 4),
                "exact_in_precision_mode": probe(s, precision_mode=True).exact,
            }
            for s in SCHEMES
        },  # fmt: skip
        "calibration_images": reader.images,
    }
    return files, info, data


def evaluate(files: dict[str, Path], data: Any) -> dict[str, dict[str, float]]:
    """Top-1 on every test image and argmax agreement with FP32, each file fed as its metadata says,
    in a plain ORT session (``MODE`` rows: in ORT's precision mode)."""
    from compress.deploy import Predictor

    x, y = data.test_x.numpy(), data.test_y.numpy()
    preds = {}
    for key, path in files.items():
        p = Predictor(path, exact_int8=key.endswith(MODE))
        preds[key] = np.concatenate([p.logits(x[i : i + 500], layout="nchw").argmax(1) for i in range(0, len(x), 500)])
    return {
        k: {"top1": float((v == y).mean()), "agree_fp32": float((v == preds["fp32"]).mean())} for k, v in preds.items()
    }


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"# INT8 schemes on {env['isa']}",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {machine(env)}, 2 cores, no GPU; onnxruntime {env['onnxruntime']}  ",
        f"Date: {result['date'][:10]}  ",
        "Each model's FP32 ONNX quantized with every scheme by `ptq.static` (the quantize stage's defaults: QDQ, "
        f"per-channel weights, percentile 99.999 on the same {CALIBRATION['batches'] * CALIBRATION['batch_size']} "
        "training images, ranges shared). Top-1 and argmax agreement with FP32 on every test image; p50 latency "
        f"of every file timed round-robin in one process ({result['rounds']} rounds, a fresh ORT session per turn, "
        "random pixels). `auto` is the scheme the quantize stage picks on this host (its row is that file). "
        f"Rows marked `{MODE}` are the file above them in a session with ONNX Runtime's "
        "`session.x64quantprecision=1`, which compress's own sessions and `Predictor` use for a file whose scheme "
        "saturates on the CPU at hand; every other row is a plain ORT session. "
        "Targets: `auto` loses <= 0.3 pt top-1 and is faster than FP32 at batch 32.",
        "",
        "ORT's probe on this host (max relative error of its INT8 kernels at each scheme's extremes): "
        + ", ".join(
            f"{s} {'exact' if p['exact'] else 'NOT exact'} ({100 * p['worst_error']:.0f}%"
            f"{'' if p['exact'] else '; in precision mode ' + ('exact' if p['exact_in_precision_mode'] else 'NOT')})"
            for s, p in next(iter(result["models"].values()))["probe"].items()
        )
        + ".",
        "",
        "| model | scheme | top-1 | Δ vs FP32 | agrees with FP32 | bs1 1 thread | bs1 2 threads | bs32 1 thread "
        "| bs32 2 threads |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, r in result["models"].items():
        base = r["accuracy"]["fp32"]["top1"]
        fp = r["latency"]["fp32"]
        for key in ("fp32", *[k for k in r["accuracy"] if k != "fp32"], "auto"):
            src = r["auto"] if key == "auto" else key
            acc, lat = r["accuracy"][src], r["latency"][src]
            label = f"**auto** (= {src})" if key == "auto" else key
            cells = [
                f"{lat[c[3]]:.3f} ms" + ("" if src == "fp32" else f" ({fp[c[3]] / lat[c[3]]:.2f}×)") for c in CONFIGS
            ]
            delta = "–" if src == "fp32" else f"{100 * (acc['top1'] - base):+.2f} pt"
            lines.append(f"| {model} | {label} | {100 * acc['top1']:.2f}% | {delta} | {100 * acc['agree_fp32']:.1f}% | "
                         + " | ".join(cells) + " |")  # fmt: skip
    lines += ["", "(×) = FP32's p50 / this file's, same column. " + result["verdict"], ""]
    return "\n".join(lines)


def verdict(models: dict[str, Any]) -> str:
    out = []
    for model, r in models.items():
        a, fp = r["auto"], "fp32"
        drop = 100 * (r["accuracy"][fp]["top1"] - r["accuracy"][a]["top1"])
        faster = all(r["latency"][a][k] < r["latency"][fp][k] for k in ("bs32_t1", "bs32_t2"))
        ok = drop <= 0.3 and faster
        out.append(f"{model}: auto ({a}) drops {drop:.2f} pt, {'faster' if faster else 'NOT faster'} than FP32 at "
                   f"batch 32 ({'meets' if ok else 'MISSES'} the targets)")  # fmt: skip
    return "; ".join(out) + "."


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="../shared/data/cifar10-jpeg.tar.gz")
    ap.add_argument("--work", default="runs/int8-isa")
    ap.add_argument("--models", default="resnet20,resnet56,digits")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--train-only", action="store_true")
    args = ap.parse_args()
    work = (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.UTC)
    fp32 = train(work, args.models.split(","), args.root)
    if args.train_only:
        return 0
    models: dict[str, Any] = {}
    for name, path in fp32.items():
        files, info, data = quantize_all(name, path, work / name / "schemes")
        acc = evaluate(files, data)
        print(f"{name}: top-1 " + ", ".join(f"{k} {100 * v['top1']:.2f}%" for k, v in acc.items()), flush=True)
        lat = side_by_side(files, 2, args.rounds, CONFIGS, frozenset(k for k in files if not k.endswith(MODE)))
        models[name] = {"files": {k: str(v.relative_to(ROOT)) for k, v in files.items()}, **info,
                        "accuracy": acc, "latency": lat}  # fmt: skip
    result = {**stamp(started, 2), "rounds": args.rounds, "calibration": CALIBRATION, "models": models}
    result["verdict"] = verdict(models)
    save(f"int8_isa_{isa_kind(result['environment'])}", result, markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
