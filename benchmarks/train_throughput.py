"""Training throughput: our train/distill stages vs a plain hand-written PyTorch loop, and
cached-teacher KD vs live-teacher KD, on the same CIFAR-10 images, models and numerics.

    python benchmarks/train_throughput.py [--root ../shared/data/cifar10-jpeg.tar.gz] [--images 12800]
                                          [--epochs 3] [--compare-precision]

Every configuration trains ResNet-20 (KD: from a ResNet-56 teacher; random weights, speed does not
depend on them) for ``--epochs`` epochs over the same ``--images`` CIFAR-10 training images at batch
128, channels_last + bf16 autocast where the CPU has native bf16, evaluating on 1,000 test images
after every epoch (the plain loop does the same). The plain loops are what a careful user writes by
hand: tensors in memory, the same crop+flip augmentation, teacher under ``inference_mode``. The
first epoch is warm-up (and fills the teacher cache); the table reports the median of the others.

``--compare-precision`` adds our train and distill stages at ``precision: fp32`` and ``bf16``
whatever the CPU: does bf16 autocast pay on this CPU (``precision: auto`` takes it only where the
CPU has native bf16, avx512_bf16/amx)?

Writes benchmarks/results/train_throughput_<kind>.{json,md}, one pair per class of CPU (training
speed from one ISA says nothing about another). Targets (issue 4): our distill epoch ≥ 0.9× the
plain loop's throughput; cached-teacher KD ≥ 1.8× live-teacher KD.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import ROOT, command, isa_kind, machine, save

sys.path.insert(0, str(ROOT))

from compress.context import Context  # noqa: E402
from compress.data.base import DataBundle, augment_batch  # noqa: E402
from compress.distill.losses.hinton import hinton_loss  # noqa: E402
from compress.env import environment  # noqa: E402
from compress.models import build_model  # noqa: E402
from compress.recipe import validate_recipe  # noqa: E402
from compress.stages import STAGES  # noqa: E402
from compress.training import autocast_dtype  # noqa: E402

T, ALPHA = 4.0, 0.9


def subset(data: DataBundle, images: int, test_images: int) -> DataBundle:
    return DataBundle(
        data.train_x[:images].clone(),
        data.train_y[:images].clone(),
        data.test_x[:test_images].clone(),
        data.test_y[:test_images].clone(),
        data.class_names,
        data.mean,
        data.std,
        augment=True,
        batch_size=128,
        eval_batch_size=500,
    )


def precision_label(precision: str) -> str:
    name = precision.removeprefix("torch.")
    return "fp32 (no autocast)" if name == "fp32" else f"{name} autocast"


def plain_loop(data: DataBundle, epochs: int, teacher: torch.nn.Module | None) -> list[float]:
    """The hand-written baseline: per-epoch seconds (training steps + test evaluation)."""
    torch.manual_seed(0)
    dtype = autocast_dtype("auto", torch.device("cpu"))
    student = build_model("resnet20", 10, 3).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    if teacher is not None:
        teacher.to(memory_format=torch.channels_last).eval().requires_grad_(False)
    mean = torch.tensor(data.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.std).view(1, 3, 1, 1)
    n, bs = len(data.train_x), data.batch_size
    times = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(epoch)
        order = torch.randperm(n, generator=gen)
        for i in range(n // bs):
            idx = order[i * bs : (i + 1) * bs]
            x = (data.train_x[idx].float() / 255 - mean) / std
            x = augment_batch(x, 4, True, gen).contiguous(memory_format=torch.channels_last)
            y = data.train_y[idx]
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                if teacher is not None:
                    with torch.inference_mode():
                        z_t = teacher(x)
                    z_s = student(x)
                    loss = hinton_loss(z_s, z_t.clone(), y, temperature=T, alpha=ALPHA)
                else:
                    loss = F.cross_entropy(student(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        student.eval()
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            for j in range(0, len(data.test_x), 500):
                x = ((data.test_x[j : j + 500].float() / 255 - mean) / std).contiguous(
                    memory_format=torch.channels_last
                )
                student(x).argmax(1)
        student.train()
        times.append(time.perf_counter() - t0)
    return times


def ours(data: DataBundle, epochs: int, stage: dict, teacher: torch.nn.Module | None, work: Path) -> list[float]:
    """Our stage, run as the pipeline runs it: per-epoch seconds from its training history."""
    torch.manual_seed(0)
    raw = {
        "name": "throughput",
        "device": "cpu",
        "data": {"name": "synthetic"},  # replaced by the CIFAR subset below
        "student": {"model": "resnet20"},
        "stages": [stage],
        "benchmark": {"devices": ["cpu"]},
    }
    if teacher is not None:
        raw["teacher"] = {"model": "resnet56"}
    recipe = validate_recipe(raw)
    models = {"student": build_model("resnet20", 10, 3)}
    if teacher is not None:
        models["teacher"] = teacher
    (st,) = recipe.stages
    st.preflight(models, data, "stages.0")
    ctx = Context(recipe, torch.device("cpu"), work, data, models, specs={}, quiet=True, stage_index=1)
    metrics = st.apply(ctx)
    return [row["seconds"] for row in metrics["history"]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="../shared/data/cifar10-jpeg.tar.gz")
    ap.add_argument("--images", type=int, default=12_800)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compare-precision", action="store_true", help="also train/distill at fp32 and at bf16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = dt.datetime.now(dt.UTC)
    full = validate_recipe(
        {
            "name": "x",
            "data": {"name": "cifar10", "root": args.root},
            "student": {"model": "resnet20"},
            "stages": [{"kind": "train", "epochs": 1}],
        }
    ).data.load()
    data = subset(full, args.images, 1000)
    assert "distill" in STAGES
    e = args.epochs
    train = {"kind": "train", "epochs": e, "optim": {"lr": 0.1, "warmup_epochs": 0}}
    kd = {"loss": "hinton", "temperature": T, "alpha": ALPHA}
    distill = {"kind": "distill", "epochs": e, "optim": {"lr": 0.1}, "kd": kd}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        teacher = build_model("resnet56", 10, 3)
        rows = {
            "plain loop, CE": plain_loop(data, e, None),
            "compress train": ours(data, e, train, None, work / "a"),
            "plain loop, KD (live teacher)": plain_loop(data, e, teacher),
            "compress distill, live teacher": ours(data, e, distill, teacher, work / "b"),
            "compress distill, cached teacher (augment_views: 1)": ours(
                data, e, {**distill, "kd": {**kd, "cache_teacher": True, "augment_views": 1}}, teacher, work / "c"
            ),
            "compress distill, live teacher (augment_views: 1)": ours(
                data, e, {**distill, "kd": {**kd, "augment_views": 1}}, teacher, work / "d"
            ),
        }
        if args.compare_precision:
            for precision in ("fp32", "bf16"):
                for what, stage, t in (("train", train, None), ("distill, live teacher", distill, teacher)):
                    name = f"compress {what}, precision: {precision}"
                    rows[name] = ours(
                        data,
                        e,
                        {**stage, "optim": {**stage["optim"], "precision": precision}},
                        t,
                        work / name.replace(" ", "_"),
                    )
    steps = args.images // 128
    result = {
        name: {
            "epoch_seconds": [round(t, 3) for t in times],
            "steady_seconds": statistics.median(times[1:]),
            "images_per_s": steps * 128 / statistics.median(times[1:]),
        }
        for name, times in rows.items()
    }

    def ratio(a: str, b: str) -> float:
        return result[a]["images_per_s"] / result[b]["images_per_s"]

    checks = {
        "compress train / plain loop (CE)": ratio("compress train", "plain loop, CE"),
        "compress distill / plain loop (KD), target >= 0.9": ratio(
            "compress distill, live teacher", "plain loop, KD (live teacher)"
        ),
        "cached / live teacher KD, target >= 1.8": ratio(
            "compress distill, cached teacher (augment_views: 1)", "compress distill, live teacher (augment_views: 1)"
        ),
    }
    if args.compare_precision:
        for what in ("train", "distill, live teacher"):
            checks[f"bf16 / fp32 autocast ({what})"] = ratio(
                f"compress {what}, precision: bf16", f"compress {what}, precision: fp32"
            )
    env = environment(args.threads)
    out = {
        "command": command(),
        "date": started.isoformat(timespec="seconds"),
        "machine": env["cpu"],
        "threads": args.threads,
        "setup": {
            "images": steps * 128,
            "test_images": 1000,
            "batch_size": 128,
            "epochs": e,
            "precision": str(autocast_dtype("auto", torch.device("cpu")) or "fp32"),  # what auto picks here
            "channels_last": True,
            "student": "resnet20",
            "teacher": "resnet56",
        },
        "results": result,
        "ratios": checks,
        "environment": env,
    }
    lines = [
        "# Training throughput: compress vs a plain PyTorch loop; cached vs live teacher",
        "",
        f"Command: `{out['command']}`  ",
        f"Machine: {machine(env)}, {args.threads} threads, no GPU  ",
        f"Date: {started:%Y-%m-%d}  ",
        f"Setup: ResNet-20 student (KD: ResNet-56 teacher), {steps * 128} CIFAR-10 training images, batch 128, "
        f"{precision_label(out['setup']['precision'])} + channels_last, 1,000 test images evaluated "
        f"after each epoch; {e} epochs, the first is warm-up (and fills the cache); median of the rest.",
        "",
        "| configuration | s / epoch | images / s | epoch seconds |",
        "|---|---|---|---|",
    ]
    for name, r in result.items():
        epochs_s = ", ".join(f"{t:.1f}" for t in r["epoch_seconds"])
        lines.append(f"| {name} | {r['steady_seconds']:.1f} | {r['images_per_s']:.0f} | {epochs_s} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f}× |" for k, v in checks.items()]
    lines.append("")
    save(f"train_throughput_{isa_kind(env)}", out, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
