"""Which calibration method should the quantize stage default to? Top-1 of the same FP32 ONNX files
quantized with each method (our other defaults: QDQ, U8S8, per-channel; 512 calibration images).

    python benchmarks/calibration_methods.py [--work runs/quant-peers] [--models resnet20,resnet56]

Reads the FP32 ``model.onnx`` of the runs that benchmarks/quant_peers.py leaves under ``--work``
(the KD ResNet-20 and the ResNet-56 of benchmarks/distill_cifar.py), so run that first. Top-1 on
the 10k CIFAR-10 test images. Writes benchmarks/results/calibration_methods.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
from pathlib import Path

import yaml
from common import ROOT, machine, save, stamp

METHODS = [("minmax", None), ("entropy", None), ("percentile", 99.99), ("percentile", 99.999)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/quant-peers")
    ap.add_argument("--models", default="resnet20,resnet56")
    args = ap.parse_args()
    from compress import metadata
    from compress.bench.measure import onnx_accuracy
    from compress.onnx_utils import session
    from compress.pipeline import load_data
    from compress.quantization import ptq
    from compress.quantization.calibration import BatchReader
    from compress.recipe import validate_recipe

    work = (ROOT / args.work).resolve()
    started = dt.datetime.now(dt.UTC)
    rows, data = [], None
    for key in args.models.split(","):
        fp32 = work / key / "model.onnx"
        if not fp32.is_file():
            print(f"calibration_methods: no {fp32}; run benchmarks/quant_peers.py first", file=sys.stderr)
            return 2
        data = data or load_data(validate_recipe(yaml.safe_load((work / f"{key}.yaml").read_text())))
        sess = session(fp32)
        feed = metadata.feeder(sess, data)
        reader = BatchReader(data, sess.get_inputs()[0].name, 16, 32, feed)
        rows.append({"model": key, "method": "fp32", "top1": onnx_accuracy(fp32, data)})
        with tempfile.TemporaryDirectory() as tmp:
            pre = Path(tmp) / "pre.onnx"
            ptq.preprocess(fp32, pre)
            for method, pct in METHODS:
                out = Path(tmp) / "q.onnx"
                ptq.static(pre, out, reader, method=method, **({"percentile": pct} if pct else {}))
                label = f"{method} {pct}" if pct else method
                rows.append({"model": key, "method": label, "top1": onnx_accuracy(out, data, feed=feed)})
                print(rows[-1], flush=True)
    result = {**stamp(started, 2), "rows": rows}
    env = result["environment"]
    md = [
        "# Calibration methods: INT8 top-1 on CIFAR-10 (ONNX Runtime static QDQ, U8S8 per-channel)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {machine(env)}, no GPU  ",
        f"Date: {result['date']}  ",
        "Setup: the FP32 files of benchmarks/quant_peers.py's runs, 512 evenly spaced training images, "
        "top-1 on the 10k test images.",
        "",
        "| model | method | top-1 |",
        "|---|---|---|",
        *(f"| {r['model']} | {r['method']} | {100 * r['top1']:.2f}% |" for r in rows),
        "",
    ]
    save("calibration_methods", result, "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
