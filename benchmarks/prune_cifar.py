"""ResNet-56 on CIFAR-10 pruned to half its MACs: structured + KD fine-tune vs structured without
KD vs unstructured (AGP) at the same non-zero parameter count — top-1, size and latency.

    python benchmarks/prune_cifar.py [--teacher runs/distill-cifar/teacher/checkpoints/01-train/teacher.pt]
                                     [--epochs 4] [--work runs/prune-cifar] [--root ../shared/data/cifar10-jpeg.tar.gz]

The starting model is the ResNet-56 that benchmarks/distill_cifar.py trains (it is also the KD
teacher). Each row is one ``compress run`` of a recipe written next to its run directory, reused
when finished and continued with ``--resume`` when interrupted. Writes
benchmarks/results/prune_cifar.{json,md} with the schedule, machine and date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Any

from common import ROOT, command, machine, save, side_by_side
from distill_cifar import run  # reuse-or-resume one compress run

SEED = 0
FT = {"lr": 0.01, "weight_decay": 5.0e-4, "schedule": "cosine"}
# Each run's own report measures little; the ONNX files are timed side by side at the end instead.
BENCH = {"batch_sizes": [1], "warmup": 1, "iters": 5, "devices": ["cpu"], "torch_snapshots": False}


def recipe(name: str, root: str, teacher: Path, stages: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": name,
        "seed": SEED,
        "data": {"name": "cifar10", "root": root, "batch_size": 128, "eval_batch_size": 500},
        "teacher": {"model": "resnet56", "checkpoint": str(teacher)},
        "student": {"model": "resnet56", "checkpoint": str(teacher)},
        "stages": [*stages, {"kind": "export"}],
        "benchmark": BENCH,
    }


def art(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(a for a in report["artifacts"] if a["name"] == name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="runs/distill-cifar/teacher/checkpoints/01-train/teacher.pt")
    ap.add_argument("--root", default="../shared/data/cifar10-jpeg.tar.gz")
    ap.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs, every row")
    ap.add_argument("--work", default="runs/prune-cifar")
    args = ap.parse_args()
    teacher = (ROOT / args.teacher).resolve()
    if not teacher.is_file():
        print(f"prune_cifar: no ResNet-56 at {teacher}; run benchmarks/distill_cifar.py first", file=sys.stderr)
        return 2
    work = (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.UTC)
    tune = {"epochs": args.epochs, "optim": FT}
    structured = {"kind": "prune", "method": "l1", "target_macs": 0.5, "finetune": tune}
    structured_kd = {**structured, "finetune": {**tune, "kd": True}}
    raws = {
        "unpruned": recipe("prune_cifar_unpruned", args.root, teacher, []),
        "structured_kd": recipe("prune_cifar_kd", args.root, teacher, [structured_kd]),
        "structured": recipe("prune_cifar_nokd", args.root, teacher, [structured]),
        # the same with widths rounded to multiples of 8: odd widths fall off the CPU kernels' fast paths
        "structured_kd_round8": recipe("prune_cifar_kd_r8", args.root, teacher, [{**structured_kd, "round_to": 8}]),
    }
    reports = {name: run(work, name, raw) for name, raw in raws.items()}
    # Unstructured at the structured model's parameter count: the same number of non-zero weights.
    dense = art(reports["structured_kd"], "student@input")
    keep = art(reports["structured_kd"], "student@prune")["params"] / dense["params"]
    sparsity = round(1 - keep, 4)
    sparse = {"kind": "sparsify", "sparsity": sparsity, "sparsity_schedule": "agp", "finetune": {**tune, "kd": True}}
    raws["unstructured_kd"] = recipe("prune_cifar_sparse", args.root, teacher, [sparse])
    reports["unstructured_kd"] = run(work, "unstructured_kd", raws["unstructured_kd"])
    rows = {}
    for name, rep in reports.items():
        assert rep is not None
        student = next(a for a in reversed(rep["artifacts"]) if a["role"] == "student" and a["format"] == "torch")
        onnx = art(rep, "model.onnx")
        rows[name] = {
            "top1": student["accuracy"],
            "onnx_top1": onnx["accuracy"],
            "params": student["params"],
            "nonzero_params": student["nonzero_params"],
            "macs": student["macs"],
            "onnx_bytes": onnx["size_bytes"],
            "onnx_gzip_bytes": onnx.get("gzip_bytes"),
            "onnx_path": onnx["path"],
            "seconds": sum(st["seconds"] for st in rep["stages"]),
            "metrics": rep["stages"][0]["metrics"] if name != "unpruned" else None,
            "recipe": raws[name],
        }
    timed = side_by_side({n: Path(r["onnx_path"]) for n, r in rows.items()}, threads=2)
    for n, r in rows.items():
        r["ort_p50_ms_bs1"], r["ort_p50_ms_bs32"] = timed[n]["p50_ms_bs1"], timed[n]["p50_ms_bs32"]
    env = reports["structured_kd"]["environment"]
    out = {
        "command": command(),
        "date": started.isoformat(timespec="seconds"),
        "machine": env["cpu"],
        "threads": env["threads"],
        "seed": SEED,
        "schedule": {"finetune_epochs": args.epochs, "batch_size": 128, **FT, "target_macs": 0.5},
        "unstructured_sparsity": sparsity,
        "macs_kept_structured": reports["structured_kd"]["stages"][0]["metrics"]["macs_kept"],
        "results": rows,
    }
    what = {
        "unpruned": "ResNet-56 as trained, exported",
        "structured_kd": "structured L1 to ½ MACs, KD fine-tune from the unpruned model",
        "structured": "structured L1 to ½ MACs, plain fine-tune (CE)",
        "structured_kd_round8": "structured L1 to ½ MACs, widths rounded to 8, KD fine-tune",
        "unstructured_kd": f"unstructured AGP to {sparsity:.1%} zeros (same non-zeros), KD fine-tune",
    }
    base = rows["unpruned"]
    lines = [
        "# Pruning ResNet-56 on CIFAR-10 to half its MACs: with KD, without, and unstructured",
        "",
        f"Command: `{out['command']}`  ",
        f"Machine: {machine(env)}, {env['threads']} threads, no GPU  ",
        f"Date: {started:%Y-%m-%d}  ",
        f"Schedule: **short** — the starting ResNet-56 is benchmarks/distill_cifar.py's 15-epoch teacher "
        f"(top-1 {100 * base['top1']:.2f}%); every pruned row fine-tunes {args.epochs} epochs, SGD lr 0.01 cosine, "
        "batch 128, crop+flip, bf16 autocast, seed 0. Latency: ONNX Runtime, 2 threads, median of 200 runs "
        "(batch 1) / 40 runs (batch 32), every file timed round-robin in one process.",
        "",
        "| row | what | top-1 | params (non-zero) | MACs | ONNX | gzip | p50 bs1 | p50 bs32 | bs1 speedup |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        speed = base["ort_p50_ms_bs1"] / r["ort_p50_ms_bs1"] if base["ort_p50_ms_bs1"] and r["ort_p50_ms_bs1"] else 0
        lines.append(
            f"| {name} | {what[name]} | {100 * r['top1']:.2f}% | {r['params'] / 1e3:.0f}k "
            f"({r['nonzero_params'] / 1e3:.0f}k) | {r['macs'] / 1e6:.1f}M | {r['onnx_bytes'] / 1e6:.2f} MB | "
            f"{(r['onnx_gzip_bytes'] or 0) / 1e6:.2f} MB | {_ms(r['ort_p50_ms_bs1'])} | {_ms(r['ort_p50_ms_bs32'])} | "
            f"{speed:.2f}× |"
        )
    lines += [
        "",
        "Top-1 on the 10,000 CIFAR-10 test images (last epoch, no selection). Unstructured zeros are stored "
        "densely: same MACs, no faster in ONNX Runtime; only the gzip column shrinks.",
        "",
    ]
    save("prune_cifar", out, "\n".join(lines))
    print("\n".join(lines))
    return 0


def _ms(v: float | None) -> str:
    return f"{v:.2f} ms" if v is not None else "–"


if __name__ == "__main__":
    sys.exit(main())
