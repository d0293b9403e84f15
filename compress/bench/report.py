"""report.json is the source of truth; report.md, report.html, the plots and the console table are rendered from it.

One document model (compress.bench.document) is built from the report(s) and rendered to Markdown and to
HTML, so both files have the same sections. Dependencies go one way: document <- html <- report.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table as RichTable

from compress.bench import html
from compress.bench.document import (
    Block,
    BulletList,
    Code,
    Document,
    Emph,
    Image,
    Paragraph,
    Section,
    Span,
    Table,
    Text,
    markdown,
)
from compress.bench.plots import common_batch_size, cpu_p50, front_names, scatter_png
from compress.files import atomic_write_text


def human_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_count(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _p50(art: dict[str, Any], device: str, bs: int) -> float | None:
    if device == "cpu":
        return cpu_p50(art, bs)
    return next((r["p50_ms"] for r in art["latency"] if r["device"] == device and r["batch_size"] == bs), None)


def _reference(arts: list[dict[str, Any]], fmt: str) -> dict[str, Any] | None:
    """The teacher artifact to compare against, in the same format (ORT vs ORT, torch vs torch)."""
    teachers = [a for a in arts if a["role"] == "teacher" and a["format"] == fmt]
    return teachers[-1] if teachers else None


def cpu_runtimes(arts: list[dict[str, Any]]) -> list[str]:
    """The runtimes ONNX files were timed on, on CPU, in the order they were timed (benchmark.runtimes)."""
    names = [r["runtime"] for a in arts if a["format"] == "onnx" for r in a["latency"] if r["device"] == "cpu"]
    return list(dict.fromkeys(names))


def _runtime_p50(art: dict[str, Any], runtime: str, bs: int) -> float | None:
    rows = (r for r in art["latency"] if r["device"] == "cpu" and r["runtime"] == runtime and r["batch_size"] == bs)
    return next((r["p50_ms"] for r in rows), None)


def summary_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per artifact. ``CPU p50`` is each artifact's first CPU row (ONNX: the first runtime listed);
    where ONNX files were timed on several runtimes, one more column per batch size for each other one."""
    arts = report["artifacts"]
    batch_sizes = report["recipe"]["benchmark"]["batch_sizes"]
    others = cpu_runtimes(arts)[1:]
    has = {key: any(a.get(key) is not None for a in arts) for key in ("top5", "gzip_bytes", "peak_rss_bytes")}
    header = ["artifact", "format", "precision", "top-1"] + (["top-5"] if has["top5"] else [])
    header += ["size"] + (["gzip"] if has["gzip_bytes"] else []) + ["params", "nonzero", "MACs"]
    header += [f"CPU p50 ms (bs={bs})" for bs in batch_sizes]
    header += [f"{rt} p50 ms (bs={bs})" for rt in others for bs in batch_sizes]
    header += [f"speed-up vs teacher (bs={batch_sizes[0]})", "smaller than teacher"]
    header += ["peak RSS +"] if has["peak_rss_bytes"] else []
    rows = []
    for art in arts:
        ref = _reference(arts, art["format"])
        lat = [_p50(art, "cpu", bs) for bs in batch_sizes]
        speed = size = "–"
        if ref is not None and ref is not art:
            r, a = _p50(ref, "cpu", batch_sizes[0]), lat[0]
            speed = f"{r / a:.2f}×" if r and a else "–"
            size = f"{ref['size_bytes'] / art['size_bytes']:.1f}×"
        top5 = [f"{100 * art['top5']:.2f}%" if art.get("top5") is not None else "–"] if has["top5"] else []
        gz = [human_bytes(art.get("gzip_bytes"))] if has["gzip_bytes"] else []
        mem = [human_bytes(art.get("peak_rss_bytes"))] if has["peak_rss_bytes"] else []
        extra = [_runtime_p50(art, rt, bs) for rt in others for bs in batch_sizes]
        rows.append(
            [
                art["name"],
                art["format"],
                art["precision"],
                f"{100 * art['accuracy']:.2f}%" if art.get("accuracy") is not None else "–",
                *top5,
                human_bytes(art["size_bytes"]),
                *gz,
                human_count(art["params"]),
                human_count(art["nonzero_params"]),
                human_count(art["macs"]),
                *[f"{v:.3f}" if v is not None else "–" for v in lat],
                *[f"{v:.3f}" if v is not None else "–" for v in extra],
                speed,
                size,
                *mem,
            ]
        )
    return header, rows


def threads_label(threads: Any) -> str:
    return "/".join(map(str, threads)) if isinstance(threads, list) else str(threads)


def int8_notes(report: dict[str, Any]) -> list[str]:
    """Say plainly when an INT8 model is slower than the FP32 ONNX it came from."""
    arts = {a["name"]: a for a in report["artifacts"]}
    notes = []
    for art in report["artifacts"]:
        if art["precision"] != "int8":
            continue
        # Its own FP32 file: same folder and role (several runs may be benched together).
        folder = str(Path(art["path"]).parent)
        fp32 = next(
            (
                a
                for a in arts.values()
                if a["format"] == "onnx"
                and a["precision"] == "fp32"
                and a["role"] == art["role"]
                and str(Path(a["path"]).parent) == folder
            ),
            None,
        )
        if fp32 is None:
            continue
        several = len({r["threads"] for r in art["latency"]}) > 1
        runtimes = len({r["runtime"] for r in art["latency"]}) > 1
        for row in art["latency"]:
            same = ("device", "runtime", "batch_size", "threads")
            ref = next((r["p50_ms"] for r in fp32["latency"] if all(r[k] == row[k] for k in same)), None)
            if ref is None:
                continue
            ratio = ref / row["p50_ms"]
            verdict = f"{ratio:.2f}× faster" if ratio >= 1 else f"{1 / ratio:.2f}× SLOWER"
            threads = f", {row['threads']} threads" if several else ""
            on = f"{row['runtime']}, " if runtimes else ""
            notes.append(
                f"{art['name']} is {verdict} than {fp32['name']} "
                f"({on}{row['device']}, batch {row['batch_size']}{threads}: {row['p50_ms']:.3f} vs {ref:.3f} ms p50)"
            )
    return notes


def deployable(arts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The file a run ships: its last ONNX student (INT8 after FP32 in report order), else the last ONNX
    file that is not a teacher."""
    onnx = [a for a in arts if a["format"] == "onnx" and a["role"] != "teacher"]
    students = [a for a in onnx if a["role"] == "student"]
    return (students or onnx or [None])[-1]


def fastest_runtime(report: dict[str, Any]) -> tuple[str, str, list[str]] | None:
    """(the artifact's name, how it was compared, one line per batch size) naming the runtime that served
    the deployable student fastest on CPU, e.g. ``batch 1: onnxruntime 0.40 ms < openvino 0.46 ms`` (each
    runtime at its best thread count); None unless it was timed on several runtimes."""
    art = deployable(report["artifacts"])
    if art is None:
        return None
    rows = [r for r in art["latency"] if r["device"] == "cpu"]
    if len({r["runtime"] for r in rows}) < 2:
        return None
    several = len({r["threads"] for r in rows}) > 1
    lines = []
    for bs in sorted({r["batch_size"] for r in rows}):
        best: dict[str, dict[str, Any]] = {}
        for r in rows:
            if r["batch_size"] == bs and (r["runtime"] not in best or r["p50_ms"] < best[r["runtime"]]["p50_ms"]):
                best[r["runtime"]] = r
        ranked = sorted(best.values(), key=lambda r: r["p50_ms"])
        cells = [
            f"{r['runtime']} {r['p50_ms']:.3f} ms"
            + (f" ({r['threads']} thread{'s' * (r['threads'] != 1)})" if several else "")
            for r in ranked
        ]
        lines.append(f"batch {bs}: " + " < ".join(cells))
    how = "(the deployable student), CPU p50" + (", each runtime at its best thread count" if several else "")
    return art["name"], how, lines


def accuracy_steps(report: dict[str, Any]) -> tuple[list[str], list[list[Text]]]:
    """The accuracy-aware quantization loop of every quantize stage that ran it, one row per step:
    the nodes moved to float, top-1, drop and batch-1 latency; the step the stage kept is marked."""
    header = ["stage", "step", "nodes in float", "moved to float", "top-1", "drop", "p50 ms bs=1", "kept"]
    rows: list[list[Text]] = []
    for st in report.get("stages", []):
        m = st["metrics"]
        before: list[str] = []
        for i, step in enumerate(m.get("accuracy_steps", [])):
            added = [n for n in step["excluded"] if n not in before]
            before = step["excluded"]
            moved: list[Span] = []
            for n in added:
                moved += [", ", Code(n)] if moved else [Code(n)]
            rows.append(
                [
                    str(st["index"]),
                    str(i),
                    str(len(step["excluded"])),
                    tuple(moved) or "–",
                    f"{100 * step['top1']:.2f}%",
                    f"{100 * step['drop']:.2f} pt",
                    f"{step['p50_ms_bs1']:.3f}",
                    ("✓" if m["accuracy_budget_met"] else "✗ best, over budget")
                    if step["excluded"] == m["excluded_nodes"]
                    else "",
                ]
            )
    return header, rows


PLOTS = {"accuracy_vs_latency": "latency", "accuracy_vs_size": "size"}


def _label(rep: dict[str, Any]) -> str:
    return rep.get("label") or rep["recipe"]["name"]


def _environment(rep: dict[str, Any]) -> str:
    env = rep["environment"]
    timed = "openvino" in cpu_runtimes(rep["artifacts"])
    openvino = f", openvino {env.get('openvino') or 'unknown'}" if timed else ""
    return (
        f"Run {rep['finished']} on {env['cpu']}{', ' + env['isa'] if env.get('isa') else ''} "
        f"({threads_label(env['threads'])} threads"
        f"{', GPU ' + env['gpu'] if env.get('gpu') else ', no GPU'}); torch {env['torch']}, "
        f"onnxruntime {env['onnxruntime']}{openvino}. Top-1 on the {rep['data']['test_images']}-image test split."
    )


def _summary(rep: dict[str, Any], fronts: dict[str, set[tuple[str, str]]]) -> Table:
    """The summary table plus a Pareto front column (the front over every run in the document)."""
    header, rows = summary_rows(rep)
    marks = [", ".join(k for k, front in fronts.items() if (_label(rep), a["name"]) in front) for a in rep["artifacts"]]
    return Table(
        [*header, "Pareto front"],
        [[*r, m or "–"] for r, m in zip(rows, marks, strict=True)],
        highlight=[bool(m) for m in marks],
    )


def _latency(rep: dict[str, Any]) -> Section | None:
    rows: list[list[Text]] = [
        [a["name"], r["device"], r["runtime"], str(r["batch_size"]), str(r["threads"])]
        + [f"{r[k]:.3f}" for k in ("p50_ms", "p90_ms", "p99_ms")]
        + [f"{r['throughput']:.0f}"]
        for a in rep["artifacts"]
        for r in a["latency"]
    ]
    if not rows:
        return None
    header = ["artifact", "device", "runtime", "batch", "threads", "p50 ms", "p90 ms", "p99 ms", "images/s"]
    blocks: list[Block] = []
    fastest = fastest_runtime(rep)
    if fastest is not None:
        name, how, lines = fastest
        blocks += [Paragraph(("Fastest runtime for ", Code(name), f" {how}:")), BulletList(list(lines))]
    if len(several := cpu_runtimes(rep["artifacts"])) > 1:
        blocks.append(
            Paragraph(
                f"ONNX files were timed on {', '.join(several)}; the summary's CPU p50 columns are {several[0]} "
                "(torch for checkpoints), with one more column per batch size for each other runtime."
            )
        )
    return Section("Latency", [*blocks, Table(header, rows)])


def _deploy(rep: dict[str, Any]) -> Section | None:
    onnx_rows = [a for a in rep["artifacts"] if a.get("input")]
    if not onnx_rows:
        return None
    return Section(
        "Deploy",
        [
            Paragraph(
                "Each ONNX file describes itself in its metadata (class names, input layout, normalization, "
                "recipe hash, measured top-1); ONNX latency above includes any preprocessing done in the graph."
            ),
            BulletList([(Code(a["name"]), f" takes {a['input']}") for a in onnx_rows]),
            Paragraph(
                (
                    "Top-k for image files or folders, needing only onnxruntime, numpy and Pillow: ",
                    Code("compress predict model.onnx IMAGE_OR_FOLDER ... --top-k 5"),
                    " (or ",
                    Code("python compress/deploy.py ..."),
                    ").",
                )
            ),
        ],
    )


def _stages(rep: dict[str, Any]) -> Section | None:
    if not rep.get("stages"):
        return None
    rows: list[list[Text]] = [
        [str(st["index"]), st["kind"], f"{st['seconds']:.1f}", _stage_summary(st["metrics"])] for st in rep["stages"]
    ]
    return Section("Stages", [Table(["#", "stage", "seconds", "result"], rows)])


def _accuracy_loop(rep: dict[str, Any]) -> Section | None:
    header, steps = accuracy_steps(rep)
    if not steps:
        return None
    intro = (
        "Each step keeps the nodes with the worst quantization error in float and re-quantizes; the stage "
        "keeps the first step within ",
        Code("max_accuracy_drop"),
        " (top-1 and drop on its ",
        Code("accuracy_images"),
        ").",
    )
    return Section("Accuracy-aware quantization", [Paragraph(intro), Table(header, steps)])


def _notes(rep: dict[str, Any]) -> Section | None:
    notes = int8_notes(rep) + rep.get("notes", [])
    return Section("Notes", [BulletList(list(notes), css_class="note")]) if notes else None


def _plots(pngs: dict[str, bytes | None]) -> Section:
    intro = (
        "One point per artifact; the dashed line is the Pareto front: the artifacts no other one beats on both "
        "accuracy and latency / size (the ",
        Emph("Pareto front"),
        " column; report.html shades those rows and has the plots embedded).",
    )
    images = [Image(name.replace("_", " "), f"{name}.png", pngs.get(name)) for name in PLOTS]
    return Section("Plots", [Paragraph(intro), *images])


def _run_sections(rep: dict[str, Any]) -> list[Block]:
    return [s for s in (_latency(rep), _deploy(rep), _stages(rep), _accuracy_loop(rep), _notes(rep)) if s]


def _fronts(reports: Sequence[dict[str, Any]]) -> dict[str, set[tuple[str, str]]]:
    return {axis: front_names(reports, axis) for axis in ("latency", "size")}


def _comparison_table(reports: Sequence[dict[str, Any]], fronts: dict[str, set[tuple[str, str]]]) -> Table:
    bs = common_batch_size(reports)
    header = ["run", "artifact", "format", "precision", "top-1", "size", "MACs", f"CPU p50 ms (bs={bs})", "Pareto"]
    rows: list[list[Text]] = []
    marked = []
    for rep in reports:
        label = _label(rep)
        for art in rep["artifacts"]:
            p50 = cpu_p50(art, bs) if bs is not None else None
            front = [k for k, s in fronts.items() if (label, art["name"]) in s]
            rows.append(
                [
                    label,
                    art["name"],
                    art["format"],
                    art["precision"],
                    f"{100 * art['accuracy']:.2f}%" if art.get("accuracy") is not None else "–",
                    human_bytes(art["size_bytes"]),
                    human_count(art.get("macs")),
                    f"{p50:.3f}" if p50 is not None else "–",
                    ", ".join(front) or "–",
                ]
            )
            marked.append(bool(front))
    return Table(header, rows, highlight=marked)


def document(reports: Sequence[dict[str, Any]], pngs: dict[str, bytes | None]) -> Document:
    """The report of one run, or the comparison of several, as one document both renderers walk."""
    fronts = _fronts(reports)
    if len(reports) == 1:
        rep = reports[0]
        blocks: list[Block] = [Paragraph(_environment(rep)), _summary(rep, fronts), _plots(pngs)]
        return Document(f"Compression report: {rep['recipe']['name']}", blocks + _run_sections(rep))
    blocks = [
        Paragraph(
            (
                "Top-1 is each run's own test split; compare runs on the same dataset. ",
                Emph("Pareto"),
                " marks the artifacts no other one beats on both accuracy and latency / size.",
            )
        ),
        _comparison_table(reports, fronts),
        _plots(pngs),
    ]
    for rep in reports:
        intro = Paragraph(("Recipe ", Code(rep["recipe"]["name"]), ". ", _environment(rep)))
        blocks.append(Section(_label(rep), [intro, _summary(rep, fronts), *_run_sections(rep)]))
    return Document(f"Compression comparison: {len(reports)} runs", blocks)


def _stage_summary(metrics: dict[str, Any]) -> str:
    bits = []
    if metrics.get("test_acc") is not None:  # a training stage says after how long; any stage may report it
        trained = (
            f" after {metrics['epochs']} epochs ({metrics.get('precision', 'fp32')})" if "epochs" in metrics else ""
        )
        bits.append(f"test top-1 {100 * metrics['test_acc']:.2f}%{trained}")
    if "params_before" in metrics:
        bits.append(
            f"params {human_count(metrics['params_before'])} → {human_count(metrics['params_after'])}, "
            f"MACs {human_count(metrics['macs_before'])} → {human_count(metrics['macs_after'])}"
        )
    for role in ("student", "teacher"):
        chk = metrics.get(role)
        if isinstance(chk, dict) and "max_abs_diff" in chk:
            bits.append(
                f"{role} ONNX parity max abs Δ {chk['max_abs_diff']:.1e}, argmax agree "
                f"{100 * chk['argmax_agreement']:.1f}%"
            )
    if "input" in metrics:
        bits.append(f"ONNX input {metrics['input']}")
    if "scheme_reason" in metrics:
        bits.append(f"scheme {metrics['scheme_reason']}")
    if "calibration" in metrics:
        bits.append(f"{metrics['calibration']} calibration on {metrics['calibration_images']} images")
    if "accuracy_steps" in metrics:
        n = len(metrics["excluded_nodes"])
        verdict = "within" if metrics["accuracy_budget_met"] else "OVER"
        bits.append(
            f"top-1 {100 * metrics['fp32_top1']:.2f}% → {100 * metrics['int8_top1']:.2f}% ({verdict} budget), "
            f"{n} node{'s' * (n != 1)} in float"
        )
    for precision in ("int8", "fp16"):
        if f"{precision}_bytes" in metrics:
            bits.append(f"{human_bytes(metrics['fp32_bytes'])} → {human_bytes(metrics[f'{precision}_bytes'])}")
    if "speed" in metrics:
        bits.append(f"{metrics['speed']['speedup_bs1']:.2f}× FP32's speed at batch 1 (timed in the stage)")
    return "; ".join(bits) or "–"


def write(run_dir: Path, report: dict[str, Any]) -> None:
    """report.json (the source of truth), then everything rendered from it."""
    _atomic_write(run_dir / "report.json", json.dumps(report, indent=2) + "\n")
    render(run_dir, [report])


def render(out_dir: Path, reports: list[dict[str, Any]]) -> list[Path]:
    """report.md, report.html and the two PNG plots for one run or a comparison of several."""
    pngs = {name: scatter_png(reports, axis) for name, axis in PLOTS.items()}
    written = []
    for name, png in pngs.items():
        if png is not None:
            written.append(_atomic_write(out_dir / f"{name}.png", png))
    doc = document(reports, pngs)
    written.append(_atomic_write(out_dir / "report.md", markdown(doc)))
    written.append(_atomic_write(out_dir / "report.html", html.render(doc)))
    return written


REQUIRED_KEYS = ("recipe", "environment", "data", "artifacts", "finished")


def load_reports(run_dirs: list[Path]) -> list[dict[str, Any]]:
    """Each run's report.json, labelled by its folder name (made unique); one-line errors."""
    from compress.errors import CompressError

    reports, seen = [], {}
    for d in run_dirs:
        path = d / "report.json" if d.is_dir() else d
        if not path.is_file():
            why = "no such folder" if not d.exists() else "no report.json (not a finished compress run)"
            raise CompressError(f"{d}: {why}")
        try:
            rep = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CompressError(f"{path}: not a readable report ({exc})") from None
        missing = [k for k in REQUIRED_KEYS if not isinstance(rep, dict) or k not in rep]
        if not missing:
            missing = _missing_fields(rep)
        if missing:
            raise CompressError(f"{path}: not a compress report (missing {', '.join(missing)})")
        label = path.parent.name
        seen[label] = seen.get(label, 0) + 1
        rep["label"] = label if seen[label] == 1 else f"{label}#{seen[label]}"
        reports.append(rep)
    return reports


ARTIFACT_KEYS = ("name", "role", "format", "precision", "accuracy", "size_bytes", "params", "latency")


def _missing_fields(rep: dict[str, Any]) -> list[str]:
    """The nested fields the renderers read, so a hand-edited or foreign report fails here, in one line."""
    missing = []
    bench = rep["recipe"].get("benchmark") if isinstance(rep["recipe"], dict) else None
    if not isinstance(bench, dict) or not bench.get("batch_sizes"):
        missing.append("recipe.benchmark.batch_sizes")
    for key in ("cpu", "threads", "torch", "onnxruntime"):
        if not isinstance(rep["environment"], dict) or key not in rep["environment"]:
            missing.append(f"environment.{key}")
    if not isinstance(rep["data"], dict) or "test_images" not in rep["data"]:
        missing.append("data.test_images")
    arts = rep["artifacts"] if isinstance(rep["artifacts"], list) else []
    for i, art in enumerate(arts):
        gone = [k for k in ARTIFACT_KEYS if not isinstance(art, dict) or k not in art]
        if gone:
            missing.append(f"artifacts.{i}.{gone[0]}")
            break
    if not isinstance(rep["artifacts"], list):
        missing.append("artifacts (a list)")
    return missing


def _atomic_write(path: Path, data: str | bytes) -> Path:
    """Readers see the old file or the new one; a failed write is one line (see compress.files)."""
    atomic_write_text(data, path, hint="nothing was left half-written; free disk space and run again")
    return path


CONSOLE_COLUMNS = {
    "artifact": "artifact",
    "precision": "prec",
    "top-1": "top-1",
    "size": "size",
}


def print_table(report: dict[str, Any], console: Console) -> None:
    """The summary on a terminal: the report.md table less the columns that rarely fit in 80 chars."""
    header, rows = summary_rows(report)
    first_p50 = next(h for h in header if h.startswith("CPU p50"))
    keep = [
        i
        for i, h in enumerate(header)
        if h in CONSOLE_COLUMNS or h == first_p50 or h.startswith(("speed-up", "smaller"))
    ]
    short = {h: CONSOLE_COLUMNS.get(h, h) for h in header}
    for h in header:
        if h.startswith("CPU p50"):
            short[h] = "p50 ms bs=" + h.split("=")[1].rstrip(")")
        elif h.startswith("speed-up"):
            short[h] = "speed-up"
        elif h.startswith("smaller"):
            short[h] = "smaller"
    table = RichTable(title=f"compress: {report['recipe']['name']} (full table: report.md)", show_lines=False)
    for i in keep:
        table.add_column(short[header[i]], justify="left" if i < 3 else "right", no_wrap=i == 0)
    for r in rows:
        table.add_row(*(r[i] for i in keep))
    console.print(table)
    fastest = fastest_runtime(report)
    if fastest is not None:
        console.print(f"Fastest runtime for {fastest[0]} {fastest[1]}:")
        for line in fastest[2]:
            console.print(f"  {line}")
    for note in int8_notes(report) + report.get("notes", []):
        console.print(f"• {note}")
