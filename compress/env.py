"""What the numbers were measured on: library versions, CPU model and instruction sets, threads, GPU."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

import torch


def resolved_threads(threads: int | list[int] | None) -> int | list[int]:
    """What the latency rows were timed at: the configured count(s), or torch's default."""
    if isinstance(threads, list):
        return threads[0] if len(threads) == 1 else threads
    return threads or torch.get_num_threads()


def cpu_model() -> str:
    """The CPU's name, with its family/model where /proc/cpuinfo has them: a cloud VM names every AMD
    host "AMD EPYC", which hides the generation (and its FP32 and INT8 throughput) a number came from."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def library_versions() -> dict[str, str]:
    """The versions that decide what a model computes (also stamped into every exported ONNX)."""
    import onnx
    import onnxruntime
    import onnxscript
    import torch_pruning
    import torchvision

    from compress._version import __version__

    return {
        "compress": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_pruning": getattr(torch_pruning, "__version__", "unknown"),
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxscript": getattr(onnxscript, "__version__", "unknown"),
    }


def openvino_version() -> str | None:
    """The installed OpenVINO (an optional second CPU runtime, compress.bench.runtimes), from the package
    metadata: importing it costs a third of a second."""
    import importlib.metadata

    try:
        return importlib.metadata.version("openvino")
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(threads: int | list[int] | None) -> dict[str, Any]:
    import onnxruntime

    from compress.deploy import cpu_isa, isa_label

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        **library_versions(),
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "openvino": openvino_version(),  # None: not installed
        "platform": platform.platform(),
        "cpu": cpu_model(),
        # INT8 exactness and bf16 speed depend on these (quantization.schemes; training precision auto)
        "isa": isa_label(cpu_isa()),
        "cpu_count": os.cpu_count(),
        "threads": resolved_threads(threads),
        "gpu": gpu,
    }
