"""JPEG decoding for the streaming data path (issue 22): Pillow vs torchvision.io (libjpeg-turbo),
alone and followed by the training and the evaluation transforms, on one thread as in a DataLoader
worker.

    python benchmarks/jpeg_decode.py [--images 500] [--size 256] [--rounds 7] [--work DIR]

Generates ``--images`` RGB JPEGs of ``--size``² at quality 90 (smooth random colour fields, noise
and shapes: content whose entropy-coded size is that of a photo, not of a flat colour) once under
``--work`` (default /tmp/compress-bench-jpeg-<images>-<size>; reused when complete), then times
images/s of each variant over all of them, round-robin (every round times every variant, the order
rotated each round, so drift on a shared machine hits all rows alike) after a warm-up pass.
Variants, each ending in a CHW uint8 tensor:

- decode: ``Image.open(p).convert("RGB")`` -> ``np.asarray`` -> ``torch.from_numpy(..).permute``;
  ``torchvision.io.decode_jpeg(read_file(p))``; ``torchvision.io.decode_image(read_file(p))``;
- train: each decode then ``v2.RandomResizedCrop(224, antialias=True)`` + ``RandomHorizontalFlip``
  on the uint8 tensor (and, for reference, Pillow with the same two transforms applied to the PIL
  image, the classic torchvision recipe);
- eval: Pillow resize shorter side to 256 + center crop 224 done in PIL, vs each decode then
  ``v2.Resize(256)`` + ``CenterCrop(224)`` on the tensor.

Files are read from the page cache (generated just before), so this is decode + transform cost, not
disk. Progress is kept in ``--work`` after every round: an interrupted run continues where it stopped
(same settings). Writes benchmarks/results/jpeg_decode.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import ROOT, command, machine
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(ROOT))

from compress.env import environment  # noqa: E402
from compress.files import atomic_write_text  # noqa: E402

QUALITY = 90


def synth_image(rng: np.random.Generator, size: int, tint: tuple[int, int, int] | None = None) -> Image.Image:
    """A photo-like RGB image: a smooth random colour field (coarse noise, bicubic-upsampled), a few
    blurred shapes, and per-pixel sensor-like noise; ~20 KB at 256² / q90. ``tint`` pulls the colour
    field halfway to one colour (data_throughput.py's classes: something a model can learn)."""
    coarse = rng.integers(0, 256, size=(rng.integers(3, 9), rng.integers(3, 9), 3), dtype=np.uint8)
    if tint is not None:
        coarse = ((coarse.astype(np.uint16) + np.array(tint, dtype=np.uint16)) // 2).astype(np.uint8)
    img = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.integers(0, size, 2)
        w, h = rng.integers(size // 10, size // 2, 2)
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    noisy = np.asarray(img, dtype=np.int16) + rng.normal(0, 8, (size, size, 3)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def make_jpegs(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    """``n`` JPEGs in ``folder``; a folder holding all of them (marker file written last) is reused."""
    paths = [folder / f"{i:06d}.jpg" for i in range(n)]
    done = folder / ".complete"
    if done.exists() and all(p.exists() for p in paths):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for p in paths:
        synth_image(rng, size).save(p, quality=QUALITY)
    done.write_text(f"{n} {size}\n")
    return paths


def variants() -> dict[str, Callable[[Path], torch.Tensor]]:
    """Every timed pipeline: path -> CHW uint8 tensor."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
    from torchvision.transforms import v2

    train = v2.Compose([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()])
    evalt = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224)])

    def pil(p: Path) -> torch.Tensor:
        with Image.open(p) as im:
            return pil_to_tensor(im.convert("RGB"))

    def pil_to_tensor(im: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(im)).permute(2, 0, 1)

    def tv_jpeg(p: Path) -> torch.Tensor:
        return decode_jpeg(read_file(str(p)), mode=ImageReadMode.RGB)

    def tv_image(p: Path) -> torch.Tensor:
        return decode_image(read_file(str(p)), mode=ImageReadMode.RGB)

    def pil_train_in_pil(p: Path) -> torch.Tensor:
        with Image.open(p) as im:
            return pil_to_tensor(train(im.convert("RGB")))

    def pil_eval_in_pil(p: Path) -> torch.Tensor:
        with Image.open(p) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = 256 / min(w, h)
            im = im.resize((max(256, round(w * s)), max(256, round(h * s))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - 224) // 2, (h - 224) // 2
            return pil_to_tensor(im.crop((left, top, left + 224, top + 224)))

    decoders = {"Pillow": pil, "torchvision decode_jpeg": tv_jpeg, "torchvision decode_image": tv_image}
    out: dict[str, Callable[[Path], torch.Tensor]] = {f"decode | {k}": f for k, f in decoders.items()}
    out |= {f"train | {k} + v2 on tensor": (lambda p, f=f: train(f(p))) for k, f in decoders.items()}
    out["train | Pillow + v2 on PIL image"] = pil_train_in_pil
    out["eval | Pillow, resize + crop in PIL"] = pil_eval_in_pil
    out |= {f"eval | {k} + v2 on tensor": (lambda p, f=f: evalt(f(p))) for k, f in decoders.items()}
    return out


def check_same_pixels(paths: list[Path], fns: dict[str, Callable[[Path], torch.Tensor]]) -> dict[str, float]:
    """Mean |difference| (0-255) of each decoder's pixels from Pillow's on a few files: the decoders are
    the same libjpeg-turbo, so this should be ~0 (a different IDCT/upsampling would show here)."""
    ref = [fns["decode | Pillow"](p).float() for p in paths[:20]]
    out = {}
    for name in ("decode | torchvision decode_jpeg", "decode | torchvision decode_image"):
        diffs = [(fns[name](p).float() - r).abs().mean().item() for p, r in zip(paths[:20], ref, strict=True)]
        out[name] = round(statistics.fmean(diffs), 4)
    return out


def time_variant(fn: Callable[[Path], torch.Tensor], paths: list[Path]) -> float:
    """images/s of ``fn`` over every path."""
    t0 = time.perf_counter()
    for p in paths:
        fn(p)
    return len(paths) / (time.perf_counter() - t0)


def summary(samples: list[float]) -> dict[str, Any]:
    return {
        "images_per_s": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "spread_pct": 100 * (max(samples) - min(samples)) / statistics.median(samples),
        "rounds": samples,
    }


def write(stem: str, result: dict[str, Any], markdown: str) -> None:
    """benchmarks/results/<stem>.{json,md}, each written atomically."""
    atomic_write_text(json.dumps(result, indent=2) + "\n", ROOT / "benchmarks" / "results" / f"{stem}.json")
    atomic_write_text(markdown, ROOT / "benchmarks" / "results" / f"{stem}.md")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--work", type=Path, default=None, help="default /tmp/compress-bench-jpeg-<images>-<size>")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker
    torch.manual_seed(0)
    started = dt.datetime.now(dt.UTC)
    work = args.work or Path(f"/tmp/compress-bench-jpeg-{args.images}-{args.size}")
    paths = make_jpegs(work / "images", args.images, args.size)
    kb = statistics.fmean(p.stat().st_size for p in paths) / 1024
    fns = variants()
    pixels = check_same_pixels(paths, fns)

    progress = work / "progress.json"
    settings = {"images": args.images, "size": args.size, "variants": list(fns)}
    state = json.loads(progress.read_text()) if progress.exists() else {}
    if state.get("settings") != settings:
        state = {"settings": settings, "samples": {n: [] for n in fns}}
    for fn in fns.values():  # warm-up: one pass over a slice, every variant (imports, allocator, caches)
        time_variant(fn, paths[: max(20, len(paths) // 10)])
    names = list(fns)
    for r in range(len(state["samples"][names[0]]), args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            state["samples"][n].append(time_variant(fns[n], paths))
        atomic_write_text(json.dumps(state), progress)
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    rows = {n: summary(s[: args.rounds]) for n, s in state["samples"].items()}

    def ratio(a: str, b: str) -> dict[str, float]:
        """Median of the per-round ratios (the two rows of a round ran back to back) and their range."""
        per_round = [x / y for x, y in zip(rows[a]["rounds"], rows[b]["rounds"], strict=True)]
        return {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round)}

    ratios = {
        "decode: decode_jpeg / Pillow": ratio("decode | torchvision decode_jpeg", "decode | Pillow"),
        "decode: decode_image / Pillow": ratio("decode | torchvision decode_image", "decode | Pillow"),
        "train: decode_jpeg + v2 / Pillow + v2 (tensor)": ratio(
            "train | torchvision decode_jpeg + v2 on tensor", "train | Pillow + v2 on tensor"
        ),
        "train: decode_jpeg + v2 / Pillow + v2 on PIL": ratio(
            "train | torchvision decode_jpeg + v2 on tensor", "train | Pillow + v2 on PIL image"
        ),
        "eval: decode_jpeg + v2 / Pillow, all in PIL": ratio(
            "eval | torchvision decode_jpeg + v2 on tensor", "eval | Pillow, resize + crop in PIL"
        ),
        "eval: decode_jpeg + v2 / Pillow + v2 (tensor)": ratio(
            "eval | torchvision decode_jpeg + v2 on tensor", "eval | Pillow + v2 on tensor"
        ),
    }
    env = environment(1)
    import PIL
    import torchvision

    out = {
        "command": command(),
        "date": started.isoformat(timespec="seconds"),
        "machine": machine(env),
        "threads": 1,
        "setup": {
            "images": args.images,
            "size": args.size,
            "jpeg_quality": QUALITY,
            "mean_file_kb": round(kb, 1),
            "rounds": args.rounds,
            "pillow": PIL.__version__,
            "torchvision": torchvision.__version__,
        },
        "pixels_mean_abs_diff_vs_pillow": pixels,
        "results": rows,
        "ratios": ratios,
        "environment": env,
    }
    lines = [
        "# JPEG decoding: Pillow vs torchvision.io (libjpeg-turbo), with the training and eval transforms",
        "",
        f"Command: `{out['command']}`  ",
        f"Machine: {machine(env)}, 1 thread (`torch.set_num_threads(1)`, as in a DataLoader worker), no GPU  ",
        f"Date: {started:%Y-%m-%d}  ",
        f"Setup: {args.images} generated RGB JPEGs of {args.size}×{args.size} at quality {QUALITY} "
        f"(mean {kb:.1f} KB), read from the page cache; Pillow {PIL.__version__}, torchvision "
        f"{torchvision.__version__}; one warm-up pass, then {args.rounds} rounds, every variant timed over all "
        "images in each round (round-robin, order rotated); median images/s, min–max and spread over rounds.  ",
        "Train: `v2.RandomResizedCrop(224, antialias=True)` + `RandomHorizontalFlip`. Eval: resize shorter "
        "side to 256 + center crop 224 (at 256² the resize is a no-op in both libraries, so eval is decode + crop).  ",
        "Decoded pixels, mean |Δ| from Pillow's (0–255): "
        + ", ".join(f"{k.split('| ')[1]} {v}" for k, v in pixels.items()),
        "",
        "| pipeline | variant | images / s (median) | min – max | spread |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        stage, variant = name.split(" | ")
        lines.append(
            f"| {stage} | {variant} | {r['images_per_s']:.0f} | {r['min']:.0f} – {r['max']:.0f} | "
            f"{r['spread_pct']:.0f}% |"
        )
    lines += ["", "| ratio (median of per-round ratios) | value | min – max over rounds |", "|---|---|---|"]
    lines += [f"| {k} | {v['median']:.2f}× | {v['min']:.2f} – {v['max']:.2f} |" for k, v in ratios.items()]
    lines.append("")
    write("jpeg_decode", out, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
