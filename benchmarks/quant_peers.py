"""INT8 on CIFAR-10, ours next to the peers: ORT ``quantize_static`` at its defaults, NNCF's
post-training quantization, our static PTQ, and our QAT — same FP32 ONNX files, same calibration
images, top-1 on the 10k test set, size, and latency timed side by side in one process.

    python benchmarks/quant_peers.py [--student runs/distill-cifar/kd/checkpoints/01-distill/student.pt]
                                     [--teacher runs/distill-cifar/teacher/checkpoints/01-train/teacher.pt]
                                     [--qat-epochs 4] [--qat-lr 0.01] [--work runs/quant-peers]
                                     [--models resnet20,resnet56,resnet18]

Models: the KD ResNet-20 and the ResNet-56 teacher that benchmarks/distill_cifar.py trains, and
torchvision's ResNet-18 at 32×32 with random weights (latency and size only; its top-1 means
nothing). Each model's FP32 export, our PTQ (and QAT + KD for ResNet-20) come from one
``compress run`` (reused when finished, resumed when interrupted); the peers quantize that run's
``model.onnx`` here with the 512 calibration images our stage uses (evenly spaced training images).
QAT trains the student further, so a control run gives the same ResNet-20 the same epochs of plain
KD fine-tuning without fake quantization, then our PTQ (``ft_fp32``/``ft_ptq``): QAT's gain over PTQ
beyond what extra training alone buys.
NNCF is a benchmark-only dependency (``pip install nncf``). Writes
benchmarks/results/quant_peers.{json,md}. Target (issue 6): our top-1 ≥ the best peer's, at latency
≤ 1.05× theirs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Any

from common import ROOT, machine, save, side_by_side, stamp
from distill_cifar import run  # reuse-or-resume one compress run

BENCH = {"batch_sizes": [1], "warmup": 1, "iters": 5, "devices": ["cpu"], "torch_snapshots": False}
CALIBRATION = {"calibration_batches": 16, "calibration_batch_size": 32}  # our stage's defaults: 512 images


def recipe(name: str, args: argparse.Namespace, model: str, checkpoint: Path | None) -> dict[str, Any]:
    student: dict[str, Any] = {"model": model}
    if checkpoint is not None:
        student["checkpoint"] = str(checkpoint)
    stages: list[dict[str, Any]] = [{"kind": "export"}, {"kind": "quantize", **CALIBRATION}]
    raw: dict[str, Any] = {
        "name": name,
        "seed": 0,
        "data": {"name": "cifar10", "root": args.root, "batch_size": 128, "eval_batch_size": 500},
        "student": student,
        "stages": stages,
        "benchmark": BENCH,
    }
    if model == "resnet20" and args.qat_epochs:
        raw["teacher"] = {"model": "resnet56", "checkpoint": str(args.teacher)}
        stages.append({"kind": "qat", "epochs": args.qat_epochs, "kd": True, "optim": {"lr": args.qat_lr}})
    return raw


def control(args: argparse.Namespace) -> dict[str, Any]:
    """The KD ResNet-20 fine-tuned as QAT is (epochs, lr, KD, fp32) without fake quantization, then our PTQ."""
    raw = recipe("quant_peers_resnet20_ft", args, "resnet20", args.student)
    raw["stages"] = [
        {
            "kind": "distill",
            "epochs": args.qat_epochs,
            "optim": {"lr": args.qat_lr, "precision": "fp32", "channels_last": False},
        },
        *raw["stages"][:2],
    ]
    return raw


def peers(fp32: Path, out: Path, data: Any) -> dict[str, Path]:
    """ORT quantize_static at its defaults (after quant_pre_process, which ORT recommends) and
    nncf.quantize at its defaults, both calibrated on our 512 images."""
    import nncf
    import onnx
    from onnxruntime.quantization import quantize_static

    from compress import metadata
    from compress.onnx_utils import quiet_stdout, session
    from compress.quantization.calibration import BatchReader
    from compress.quantization.ptq import preprocess

    out.mkdir(parents=True, exist_ok=True)
    sess = session(fp32)
    name = sess.get_inputs()[0].name
    reader = BatchReader(data, name, CALIBRATION["calibration_batches"], CALIBRATION["calibration_batch_size"],
                         metadata.feeder(sess, data))  # fmt: skip
    files = {"ort_defaults": out / "ort_defaults.onnx", "nncf": out / "nncf.onnx"}
    if not files["ort_defaults"].is_file():
        pre = out / "pre.onnx"
        preprocess(fp32, pre)
        with quiet_stdout():
            quantize_static(str(pre), str(files["ort_defaults"]), reader)
    if not files["nncf"].is_file():
        images = [reader.feed(data.train_x[int(i) : int(i) + 1]) for i in reader.indices]
        model = nncf.quantize(onnx.load(str(fp32)), nncf.Dataset(images, lambda x: {name: x}), subset_size=len(images))
        onnx.save(model, str(files["nncf"]))
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", default="runs/distill-cifar/kd/checkpoints/01-distill/student.pt")
    ap.add_argument("--teacher", default="runs/distill-cifar/teacher/checkpoints/01-train/teacher.pt")
    ap.add_argument("--root", default="../shared/data/cifar10-jpeg.tar.gz")
    ap.add_argument("--qat-epochs", type=int, default=4)
    ap.add_argument("--qat-lr", type=float, default=0.01)
    ap.add_argument("--work", default="runs/quant-peers")
    ap.add_argument("--models", default="resnet20,resnet56,resnet18")
    args = ap.parse_args()
    args.student, args.teacher = (ROOT / args.student).resolve(), (ROOT / args.teacher).resolve()
    for path in (args.student, args.teacher):
        if not path.is_file():
            print(f"quant_peers: no checkpoint at {path}; run benchmarks/distill_cifar.py first", file=sys.stderr)
            return 2
    from compress import metadata
    from compress.bench.measure import onnx_accuracy
    from compress.onnx_utils import session
    from compress.pipeline import load_data
    from compress.recipe import validate_recipe

    work = (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.UTC)
    sources = {"resnet20": ("resnet20", args.student), "resnet56": ("resnet56", args.teacher),
               "resnet18": ("torchvision:resnet18", None)}  # fmt: skip
    data, files, trained = None, {}, {}
    for key in args.models.split(","):
        model, ckpt = sources[key]
        raw = recipe(f"quant_peers_{key}", args, model, ckpt)
        run(work, key, raw)
        data = data or load_data(validate_recipe(raw))
        run_dir = work / key
        files[key] = {"fp32": run_dir / "model.onnx", "ours_ptq": run_dir / "model.int8.onnx"}
        if (run_dir / "model.qat.onnx").is_file():
            files[key]["ours_qat"] = run_dir / "model.qat.onnx"
        files[key] |= peers(run_dir / "model.onnx", run_dir / "peers", data)
        trained[key] = ckpt is not None
        if key == "resnet20" and args.qat_epochs:
            run(work, "resnet20_ft", control(args))
            ft = work / "resnet20_ft"
            files[key] |= {"ft_fp32": ft / "model.onnx", "ft_ptq": ft / "model.int8.onnx"}
    rows: list[dict[str, Any]] = []
    for key, variants in files.items():
        feed = metadata.feeder(session(variants["fp32"]), data)
        for variant, path in variants.items():
            acc = onnx_accuracy(path, data, feed=feed) if trained[key] else None  # peers' files: no metadata
            rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            rows.append({"model": key, "variant": variant, "path": str(rel), "top1": acc, "bytes": path.stat().st_size})
            print(f"{key} {variant}: top-1 {acc}, {path.stat().st_size} bytes", flush=True)
    timed = side_by_side({f"{r['model']}/{r['variant']}": ROOT / r["path"] for r in rows}, threads=2)
    for r in rows:
        r.update(timed[f"{r['model']}/{r['variant']}"])
    write(rows, args, started)
    return 0


def write(rows: list[dict[str, Any]], args: argparse.Namespace, started: dt.datetime) -> None:
    result = {
        **stamp(started, 2),
        "calibration": "512 evenly spaced CIFAR-10 training images, no augmentation, same for every method",
        "qat": (
            f"{args.qat_epochs} epochs, KD from the ResNet-56 (Hinton T=4, α=0.9), SGD lr {args.qat_lr} cosine, fp32; "
            "control: the same fine-tuning without fake quantization, then our PTQ"
        )
        if args.qat_epochs
        else None,
        "rows": rows,
    }
    env = result["environment"]
    md = [
        "# INT8 on CIFAR-10: ours vs ORT defaults vs NNCF (ONNX Runtime, CPU)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {machine(env)}, 2 threads, no GPU  ",
        f"Date: {result['date']}  ",
        f"Calibration: {result['calibration']}. QAT: {result['qat']}.  ",
        "Variants: `ort_defaults` = quant_pre_process + quantize_static() with no options (QDQ, S8S8, per-tensor, "
        "MinMax); `nncf` = nncf.quantize() with no options; `ours_ptq` = the quantize stage's defaults (QDQ, U8S8, "
        "per-channel, percentile 99.999 calibration); `ours_qat` = the qat stage; `ft_fp32`/`ft_ptq` = "
        "the control (same fine-tuning as QAT without fake quantization; its FP32 export and our PTQ of it). "
        "Latency: p50, every file timed round-robin in one process, each turn a fresh session at ONNX Runtime's "
        "defaults (2 threads unless noted, spinning on).",
        "",
        "| model | variant | top-1 | size | p50 ms bs=1 | vs FP32 bs=1 | p50 ms bs=1, 1 thread | vs FP32 bs=1, "
        "1 thread | p50 ms bs=32 | vs FP32 bs=32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["model"]: r for r in rows if r["variant"] == "fp32"}
    for r in rows:
        acc = f"{100 * r['top1']:.2f}%" if r["top1"] is not None else "– (random weights)"
        fp32 = base[r["model"]]
        x = {k: fp32[k] / r[k] for k in ("p50_ms_bs1", "p50_ms_bs1_1thread", "p50_ms_bs32")}
        md.append(
            f"| {r['model']} | {r['variant']} | {acc} | {r['bytes'] / 1024:.0f} KB | {r['p50_ms_bs1']:.3f} | "
            f"{x['p50_ms_bs1']:.2f}× | {r['p50_ms_bs1_1thread']:.3f} | {x['p50_ms_bs1_1thread']:.2f}× | "
            f"{r['p50_ms_bs32']:.2f} | {x['p50_ms_bs32']:.2f}× |"
        )
    md.append("")
    save("quant_peers", result, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    sys.exit(main())
