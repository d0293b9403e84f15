"""The streaming data path at scale (issue 22's evidence): loader throughput and memory against a
hand-written torchvision ImageFolder + DataLoader, ResNet-18 train/distill steps through compress
against a hand-written loop over the same loader, and evaluation top-1 of the streaming path
against the tensor-resident one.

    python benchmarks/data_throughput.py [--images 20000] [--small 5000] [--rounds 3] [--steps 20]
                                         [--teacher resnet34] [--only loader,train,eval] [--quick]

Trees (generated once with benchmarks/jpeg_decode.py's photo-like 256² q90 JPEGs, 10 classes, each
tinted by its class; reused when complete; never in the repo): /tmp/compress-bench-tree-<n> with
``n`` train and n/20 val images, for ``--images`` and ``--small``, and one of ``steps x batch`` train
+ ``--eval-images`` val images for the training and evaluation parts. Every measurement runs in its
own child process; the parent polls the child's process tree (/proc: RSS and PSS summed over the
main process and its DataLoader workers) for the peak memory. Cells finished by an interrupted run
are kept in ``--work`` and skipped (same settings).

- loader: one training epoch (batch 64, 2 workers, persistent, no pinned memory; RandomResizedCrop
  224 + flip; float normalized batches) of ``ours`` (compress.data.imagefolder.ImageFolder, stream:
  true), ``tv-pil`` (torchvision.datasets.ImageFolder with its default Pillow loader and the v2
  transforms on the PIL image, then PILToTensor/ToDtype/Normalize: torchvision's reference recipe)
  and ``tv-tensor`` (the same with torchvision.io.decode_image and the transforms on uint8 tensors),
  round-robin over ``--rounds``; images/s after the first 2 batches (worker start-up is reported
  apart), on the big and the small tree.
- train: ``--steps`` steps at batch 32 of ResNet-18 (torchvision, 10 classes, 224², fp32 on CPUs
  without native bf16, channels_last) through our train / distill (Hinton KD, T=4, alpha 0.9, teacher
  ``--teacher``) stages vs a hand-written loop over the same streaming loader; the step time is the
  median interval between batches after the first 2 (all steps include waiting for data).
- eval: the same val images through stream: false (decoded once into a tensor) and stream: true,
  same model (the hand-written loop's trained student): top-1, agreement, pixels.

Targets: ours / baseline loader >= 1.0x; peak memory < 3 GB and flat from --small to --images
images; train and distill >= 0.9x the hand-written loop; equal top-1. Writes
benchmarks/results/data_throughput.{json,md}; ``--quick`` (1,000 vs 400 images, 5 steps at batch 16,
ResNet-18 teacher, 1 round) checks that it all runs (~6 minutes on a busy 2-core host) and writes
data_throughput_quick.{json,md} into its work folder, not into the results.
"""

from __future__ import annotations

import argparse
import colorsys
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT, command, machine
from jpeg_decode import QUALITY, synth_image

sys.path.insert(0, str(ROOT))

from compress.files import atomic_write_text  # noqa: E402

CLASSES, SIZE, CROP = 10, 256, 224
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # given to every loader: same normalization
T, ALPHA, SKIP = 4.0, 0.9, 2  # KD settings; batches/steps left out of the timing (start-up, warm-up)
LOADERS = ("ours", "tv-pil", "tv-tensor")


# ---------------------------------------------------------------- trees


def _tint(c: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(c / CLASSES, 0.8, 0.9)
    return int(r * 255), int(g * 255), int(b * 255)


def _write_one(job: tuple[str, int, int]) -> None:
    path, index, c = job
    synth_image(np.random.default_rng([0, index]), SIZE, _tint(c)).save(path, quality=QUALITY)


def make_tree(root: Path, train: int, val: int) -> Path:
    """train/<class>/*.jpg and val/<class>/*.jpg (image i in class i % 10, content a function of i, so
    every tree holds the same first images); reused when its marker (written last) matches."""
    marker, want = root / ".complete", f"{train} {val} {SIZE} {QUALITY}\n"
    if marker.exists() and marker.read_text() == want:
        return root
    jobs = []
    for split, n, offset in (("train", train, 0), ("val", val, 10_000_000)):
        for c in range(CLASSES):
            (root / split / f"class_{c}").mkdir(parents=True, exist_ok=True)
        folder = root / split
        jobs += [(str(folder / f"class_{i % CLASSES}" / f"{i:07d}.jpg"), offset + i, i % CLASSES) for i in range(n)]
    t0 = time.perf_counter()
    with Pool(min(2, os.cpu_count() or 1)) as pool:
        for _ in pool.imap_unordered(_write_one, jobs, chunksize=64):
            pass
    marker.write_text(want)
    print(f"generated {root} ({train} + {val} JPEGs) in {time.perf_counter() - t0:.0f} s", flush=True)
    return root


# ---------------------------------------------------------------- memory of a process tree


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def tree_memory(root: int) -> tuple[int, int, int]:
    """(RSS, PSS, processes) summed over ``root`` and its descendants, in bytes. RSS counts the pages
    forked workers share with their parent once per process (an upper bound); PSS splits them."""
    rss = pss = n = 0
    for pid in _descendants(root):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        n += 1
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key in ("Rss", "Pss"):
                kb = int(value.split()[0]) * 1024
                rss, pss = (rss + kb, pss) if key == "Rss" else (rss, pss + kb)
    return rss, pss, n


def run_child(spec: dict[str, Any], log: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one cell in a fresh process; its result plus the peak memory of its process tree."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", json.dumps(spec)],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )  # fmt: skip
        peak = [0, 0, 0]

        def poll() -> None:
            while proc.poll() is None:
                rss, pss, n = tree_memory(proc.pid)
                peak[:] = [max(peak[0], rss), max(peak[1], pss), max(peak[2], n)]
                time.sleep(0.2)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        rc = proc.wait()
        watcher.join()
    text = log.read_text()
    results = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    if rc != 0 or not results:
        raise SystemExit(f"cell {spec['cell']} failed (exit {rc}); its output, {log}:\n{text[-3000:]}")
    return {**json.loads(results[-1][7:]), "peak_rss_mb": peak[0] / 2**20, "peak_pss_mb": peak[1] / 2**20,
            "processes": peak[2]}  # fmt: skip


# ---------------------------------------------------------------- children


class Timed:
    """A train loader whose ``batches()`` stamps the time each batch arrives (the loop's step clock)."""

    stamps: list[float] = []

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def batches(self) -> Any:
        for batch in self.loader.batches():
            Timed.stamps.append(time.perf_counter())
            yield batch


def _decode_rgb(path: str) -> Any:
    from torchvision.io import ImageReadMode, decode_image, read_file

    return decode_image(read_file(path), mode=ImageReadMode.RGB)


def loader_cell(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision.transforms import v2

    tree, bs, workers = Path(spec["tree"]), spec["batch"], spec["workers"]
    t0 = time.perf_counter()
    if spec["loader"] == "ours":
        from compress.data.imagefolder import ImageFolder

        cfg = ImageFolder(
            name="imagefolder", root=tree, image_size=CROP, stream=True, workers=workers, batch_size=bs,
            mean=MEAN, std=STD,
        )  # fmt: skip
        batches = cfg.load().train_loader(seed=0).batches()
    else:
        aug = [v2.RandomResizedCrop(CROP, antialias=True), v2.RandomHorizontalFlip()]
        to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
        if spec["loader"] == "tv-pil":
            ds = datasets.ImageFolder(tree / "train", transform=v2.Compose([*aug, v2.PILToTensor(), *to_float]))
        else:
            ds = datasets.ImageFolder(tree / "train", loader=_decode_rgb, transform=v2.Compose([*aug, *to_float]))
        dl = DataLoader(
            ds, batch_size=bs, shuffle=True, num_workers=workers, persistent_workers=workers > 0,
            pin_memory=False, drop_last=True, generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        batches = iter(dl)
    setup = time.perf_counter() - t0
    stamps, n, start = [], 0, time.perf_counter()
    for x, y, *_ in batches:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, CROP, CROP) and y.dtype == torch.int64
        n += len(y)
        stamps.append(time.perf_counter())
    skip = SKIP if len(stamps) > SKIP + 2 else 0  # a tiny tree (--quick): every batch
    steady = (len(stamps) - 1 - skip) * bs / (stamps[-1] - stamps[skip])
    return {"images_per_s": steady, "epoch_images_per_s": n / (stamps[-1] - start), "images": n,
            "first_batch_s": stamps[0] - start, "setup_s": setup}  # fmt: skip


def _recipe(spec: dict[str, Any]) -> dict[str, Any]:
    data = {"name": "imagefolder", "root": spec["tree"], "image_size": CROP, "stream": True,
            "workers": spec["workers"], "batch_size": spec["batch"], "mean": list(MEAN), "std": list(STD)}  # fmt: skip
    optim = {"lr": 0.1, "warmup_epochs": 0}
    stage = {"kind": spec["mode"], "epochs": 1, "optim": optim}
    raw = {"name": "data-throughput", "device": "cpu", "seed": 0, "data": data, "stages": [stage],
           "student": {"model": "torchvision:resnet18"}, "benchmark": {"devices": ["cpu"]}}  # fmt: skip
    if spec["mode"] == "distill":
        stage["kd"] = {"loss": "hinton", "temperature": T, "alpha": ALPHA}
        raw["teacher"] = {"model": f"torchvision:{spec['teacher']}"}
    return raw


def train_cell(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from compress.context import Context
    from compress.distill.losses.hinton import hinton_loss
    from compress.files import atomic_save
    from compress.models import build_model
    from compress.recipe import validate_recipe
    from compress.training import evaluate

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    recipe = validate_recipe(_recipe(spec))
    data = recipe.data.open().limit("test", spec["batch"] * 2)  # evaluation is not what is timed
    make_loader = data.train_loader
    data.train_loader = lambda *a, **k: Timed(make_loader(*a, **k))  # type: ignore[method-assign]
    student = build_model("torchvision:resnet18", CLASSES)
    teacher = build_model(f"torchvision:{spec['teacher']}", CLASSES) if spec["mode"] == "distill" else None
    t0 = time.perf_counter()
    if spec["impl"] == "ours":
        models = {"student": student} | ({"teacher": teacher} if teacher is not None else {})
        (stage,) = recipe.stages
        stage.preflight(models, data, "stages.0")
        cpu, work = torch.device("cpu"), Path(spec["work"])
        ctx = Context(recipe, cpu, work, data, models, specs={}, quiet=True, stage_index=1)
        acc = stage.apply(ctx)["history"][-1]["test_acc"]
    else:  # what a careful user writes around the same loader
        cl = torch.channels_last
        student.to(memory_format=cl).train()
        opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        if teacher is not None:
            teacher.to(memory_format=cl).eval().requires_grad_(False)
        loader = data.train_loader(seed=0)
        loader.set_epoch(0)
        for x, y, _ in loader.batches():
            x = x.contiguous(memory_format=cl)
            if teacher is not None:
                with torch.inference_mode():
                    z_t = teacher(x)
                loss = hinton_loss(student(x), z_t.clone(), y, temperature=T, alpha=ALPHA)
            else:
                loss = F.cross_entropy(student(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        acc = evaluate(student, data.eval_loader("test"), torch.device("cpu"), channels_last=True)
        if spec["mode"] == "train":
            atomic_save(student.state_dict(), Path(spec["work"]) / "student.pt")
    seconds = time.perf_counter() - t0
    steps = np.diff(Timed.stamps)[SKIP:]  # interval i: step i's compute + waiting for batch i + 1
    return {"step_s": float(np.median(steps)), "step_s_min": float(steps.min()), "step_s_max": float(steps.max()),
            "images_per_s": spec["batch"] / float(np.median(steps)), "steps": len(Timed.stamps),
            "seconds": seconds, "test_acc": acc}  # fmt: skip


def eval_cell(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from compress.data.imagefolder import ImageFolder
    from compress.files import safe_load
    from compress.models import build_model

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = build_model("torchvision:resnet18", CLASSES).eval()
    trained = Path(spec["work"]) / "student.pt"
    if trained.exists():
        model.load_state_dict(safe_load(trained, "student"))
    out: dict[str, Any] = {"model": "the hand-written loop's student" if trained.exists() else "random init"}
    logits, labels, pixels = {}, {}, {}
    for stream in (False, True):
        kw = {"workers": spec["workers"]} if stream else {}
        cfg = ImageFolder(name="imagefolder", root=Path(spec["tree"]), image_size=CROP, stream=stream, mean=MEAN,
                          std=STD, eval_batch_size=64, **kw)  # fmt: skip
        data = cfg.load()
        out[f"stream_{str(stream).lower()}_type"] = type(data).__name__
        with torch.inference_mode():
            zs, ys = zip(*((model(x), y) for x, y in data.eval_loader("test")), strict=True)
        logits[stream], labels[stream] = torch.cat(zs), torch.cat(ys)
        pixels[stream] = torch.cat([x for x, _ in data.raw_batches("test")])
    pred = {k: v.argmax(1) for k, v in logits.items()}
    top1 = {k: (pred[k] == labels[k]).float().mean().item() for k in pred}
    out |= {
        "images": len(labels[True]),
        "top1_stream_false": top1[False],
        "top1_stream_true": top1[True],
        "same_labels": bool(torch.equal(labels[False], labels[True])),
        "prediction_agreement": (pred[False] == pred[True]).float().mean().item(),
        "max_abs_logit_diff": (logits[False] - logits[True]).abs().max().item(),
        "pixels_max_abs_diff": (pixels[False].int() - pixels[True].int()).abs().max().item(),
    }
    return out


def child(spec: dict[str, Any]) -> None:
    result = {"loader": loader_cell, "train": train_cell, "eval": eval_cell}[spec["cell"].split("/")[0]](spec)
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- the run


def spread(values: list[float]) -> dict[str, float]:
    med = statistics.median(values)
    lo, hi = min(values), max(values)
    return {"median": med, "min": lo, "max": hi, "spread_pct": 100 * (hi - lo) / med}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20_000, help="training images of the big tree")
    ap.add_argument("--small", type=int, default=5_000, help="training images of the small tree (memory)")
    ap.add_argument("--rounds", type=int, default=3, help="loader epochs per loader and tree, round-robin")
    ap.add_argument("--steps", type=int, default=20, help="training steps per train/distill configuration")
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--eval-images", type=int, default=320)
    ap.add_argument("--teacher", default="resnet34")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="loader,train,eval", help="or 'trees': generate the trees and stop")
    ap.add_argument("--quick", action="store_true", help="small trees, few steps: does it all run")
    ap.add_argument("--work", type=Path, default=Path("/tmp/compress-bench-data-throughput"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return 0
    if args.quick:
        args.images, args.small, args.rounds, args.steps = 1000, 400, 1, 5
        args.train_batch, args.eval_images, args.teacher = 16, 64, "resnet18"
        args.work = args.work.with_name(args.work.name + "-quick")
    only = set(args.only.split(","))
    started = dt.datetime.now(dt.UTC)
    work = args.work
    settings = {k: v for k, v in vars(args).items() if k not in ("only", "child", "work")}
    progress = work / "progress.json"
    state = json.loads(progress.read_text()) if progress.exists() else {}
    if state.get("settings") != settings:
        state = {"settings": settings, "cells": {}}
    cells: dict[str, Any] = state["cells"]

    def cell(name: str, spec: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
        if name not in cells:
            t0 = time.perf_counter()
            cells[name] = run_child({"cell": name, "workers": args.workers, "threads": args.threads, **spec},
                                    work / "logs" / f"{name.replace('/', '_')}.log", env)  # fmt: skip
            atomic_write_text(json.dumps(state), progress)
            print(f"{name}: {json.dumps(cells[name])} ({time.perf_counter() - t0:.0f} s)", flush=True)
        return cells[name]

    big = make_tree(Path(f"/tmp/compress-bench-tree-{args.images}"), args.images, args.images // 20)
    small = make_tree(Path(f"/tmp/compress-bench-tree-{args.small}"), args.small, args.small // 20)
    ntrain = args.steps * args.train_batch
    steps_tree = make_tree(Path(f"/tmp/compress-bench-tree-{ntrain}"), ntrain, args.eval_images)
    if only == {"trees"}:
        return 0
    loader_rows, train_rows, evaluation = {}, {}, None
    sizes = (args.images, args.small)
    loader_cells = [f"loader/{k}/{n}/{r}" for r in range(args.rounds) for n in sizes for k in LOADERS]
    train_cells = [f"train/{m}/{i}" for m in ("train", "distill") for i in ("plain", "ours")]
    # a part not asked for this time is still reported when an earlier run (same settings) finished it
    if "loader" in only or all(c in cells for c in loader_cells):
        for r in range(args.rounds):
            for tree, n in ((big, args.images), (small, args.small)):
                for kind in LOADERS:
                    cell(f"loader/{kind}/{n}/{r}", {"loader": kind, "tree": str(tree), "batch": 64})
        for n in (args.images, args.small):
            for kind in LOADERS:
                runs = [cells[f"loader/{kind}/{n}/{r}"] for r in range(args.rounds)]
                loader_rows[f"{kind} {n}"] = {
                    "loader": kind, "images": n, "images_per_s": spread([c["images_per_s"] for c in runs]),
                    "epoch_images_per_s": statistics.median(c["epoch_images_per_s"] for c in runs),
                    "first_batch_s": statistics.median(c["first_batch_s"] for c in runs),
                    "peak_rss_mb": max(c["peak_rss_mb"] for c in runs),
                    "peak_pss_mb": max(c["peak_pss_mb"] for c in runs),
                    "processes": max(c["processes"] for c in runs),
                }  # fmt: skip
    if "train" in only or all(c in cells for c in train_cells):
        for mode in ("train", "distill"):
            for impl in ("plain", "ours"):
                spec = {"mode": mode, "impl": impl, "tree": str(steps_tree), "batch": args.train_batch,
                        "teacher": args.teacher, "work": str(work / f"{mode}-{impl}")}  # fmt: skip
                train_rows[f"{mode} {impl}"] = cell(f"train/{mode}/{impl}", spec)
    if "eval" in only or "eval/equivalence" in cells:
        spec = {"tree": str(steps_tree), "work": str(work / "train-plain")}
        evaluation = cell("eval/equivalence", spec, {"COMPRESS_CACHE": str(work / "cache")})
    write(args, started, loader_rows, train_rows, evaluation)
    return 0


def write(args: argparse.Namespace, started: dt.datetime, loader: dict, train: dict, evaluation: dict | None) -> None:
    from compress.env import environment

    env = environment(args.threads)
    ratios: dict[str, float] = {}
    for n in (args.images, args.small) if loader else ():
        for base in ("tv-pil", "tv-tensor"):
            ours, theirs = loader[f"ours {n}"], loader[f"{base} {n}"]
            ratios[f"loader ours / {base}, {n} images (target >= 1.0)"] = (
                ours["images_per_s"]["median"] / theirs["images_per_s"]["median"]
            )
    if loader:
        a, b = loader[f"ours {args.images}"]["peak_pss_mb"], loader[f"ours {args.small}"]["peak_pss_mb"]
        ratios[f"ours peak PSS {args.images} / {args.small} images (flat: ~1.0)"] = a / b
    for mode in ("train", "distill") if train else ():
        ratios[f"{mode}: compress / hand-written loop (target >= 0.9)"] = (
            train[f"{mode} ours"]["images_per_s"] / train[f"{mode} plain"]["images_per_s"]
        )
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "work")}
    out = {"command": command(), "date": started.isoformat(timespec="seconds"), "machine": machine(env),
           "settings": settings, "loader": loader, "train": train, "evaluation": evaluation, "ratios": ratios,
           "environment": env}  # fmt: skip
    lines = [
        "# Streaming data at scale: loader throughput and memory, training steps, evaluation equivalence",
        "",
        f"Command: `{out['command']}`  ",
        f"Machine: {machine(env)}, {args.threads} threads, {args.workers} DataLoader workers, no GPU  ",
        f"Date: {started:%Y-%m-%d}  ",
        f"Data: generated {SIZE}×{SIZE} RGB JPEGs (quality {QUALITY}, photo-like, 10 classes), in the page cache.",
        "",
    ]
    if loader:
        lines += [
            f"## Loader: one training epoch, batch 64, RandomResizedCrop {CROP} + flip, normalized float batches",
            "",
            f"{args.rounds} epoch(s) per row, round-robin; images/s after the first {SKIP} batches (median, min–max); "
            "peak memory summed over the loader's process and its workers (RSS counts shared pages once per "
            "process; PSS splits them).",
            "",
            "| loader | train images | images / s | min – max | epoch incl. start-up | first batch s "
            "| peak RSS | peak PSS |",
            "|---|---|---|---|---|---|---|---|",
        ]
        names = {"ours": "compress streaming (stream: true)", "tv-pil": "torchvision ImageFolder (Pillow) + DataLoader",
                 "tv-tensor": "torchvision ImageFolder (decode_image) + DataLoader"}  # fmt: skip
        for r in loader.values():
            s = r["images_per_s"]
            lines.append(
                f"| {names[r['loader']]} | {r['images']} | {s['median']:.0f} | {s['min']:.0f} – {s['max']:.0f} | "
                f"{r['epoch_images_per_s']:.0f} | {r['first_batch_s']:.1f} | {r['peak_rss_mb']:.0f} MB | "
                f"{r['peak_pss_mb']:.0f} MB |"
            )
        lines.append("")
    if train:
        lines += [
            f"## ResNet-18 at {CROP}², {args.steps} steps at batch {args.train_batch} from the streaming loader",
            "",
            f"Distill: Hinton KD (T={T:g}, alpha {ALPHA}) from a torchvision {args.teacher}. Step time: median "
            f"interval between batches after the first {SKIP} (includes any wait for data).",
            "",
            "| configuration | s / step | min – max | images / s | whole run s | peak RSS | peak PSS |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in train.items():
            label = ("compress " if name.endswith("ours") else "hand-written loop, ") + name.split()[0]
            lines.append(f"| {label} | {r['step_s']:.2f} | {r['step_s_min']:.2f} – {r['step_s_max']:.2f} | "
                         f"{r['images_per_s']:.1f} | {r['seconds']:.0f} | {r['peak_rss_mb']:.0f} MB | "
                         f"{r['peak_pss_mb']:.0f} MB |")  # fmt: skip
        lines.append("")
    if evaluation:
        e = evaluation
        lines += [
            f"## Evaluation: {e['images']} val images, stream: false vs stream: true, {e['model']}",
            "",
            f"top-1 {e['top1_stream_false']:.4f} (stream: false, {e['stream_false_type']}) vs "
            f"{e['top1_stream_true']:.4f} (stream: true, {e['stream_true_type']}); predictions agree on "
            f"{100 * e['prediction_agreement']:.2f}%; max |Δ logit| {e['max_abs_logit_diff']:.2e}; pixels max "
            f"|Δ| {e['pixels_max_abs_diff']}; same labels: {e['same_labels']}.",
            "",
        ]
    lines += ["| ratio | value |", "|---|---|"] + [f"| {k} | {v:.2f}× |" for k, v in ratios.items()] + [""]
    stem = "data_throughput_quick" if args.quick else "data_throughput"
    results = args.work if args.quick else ROOT / "benchmarks" / "results"  # a check, not a result
    atomic_write_text(json.dumps(out, indent=2) + "\n", results / f"{stem}.json")
    atomic_write_text("\n".join(lines), results / f"{stem}.md")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
