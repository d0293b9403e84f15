"""Unstructured magnitude pruning with torch.nn.utils.prune: global or per-layer, one-shot or
gradual (AGP, Zhu & Gupta 2017), masks enforced through training, then made permanent.

Zeros do not make a dense kernel faster: ONNX Runtime and PyTorch multiply them like any other
weight. What shrinks is the compressed file (gzip/zip of the ONNX or state dict), which is what a
download or an over-the-air update pays for.
"""

from __future__ import annotations

import fnmatch
import gzip
import io

import torch
from torch import nn
from torch.nn.utils import prune


def prunable(model: nn.Module, ignore: list[str]) -> list[tuple[str, nn.Module]]:
    """Every Conv/Linear weight whose module name matches no ``ignore`` pattern."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear)
        and not any(fnmatch.fnmatch(name, p) for p in ignore)
    ]


def _zeros(m: nn.Module) -> int:
    mask = getattr(m, "weight_mask", None)
    return int((mask == 0).sum()) if mask is not None else int((m.weight == 0).sum())


def start(layers: list[tuple[str, nn.Module]]) -> None:
    """Attach an all-ones mask to every layer (weight = weight_orig * weight_mask from now on)."""
    for _, m in layers:
        if not prune.is_pruned(m):
            prune.identity(m, "weight")


def sparsify_to(layers: list[tuple[str, nn.Module]], sparsity: float, scope: str) -> None:
    """Grow the masks until ``sparsity`` of the weights are zero, by smallest |w|, over all layers
    together (``global``) or in each layer (``layer``). Masks only grow: a weight once removed
    stays removed, as AGP requires."""
    start(layers)
    if scope == "global":
        total = sum(m.weight.numel() for _, m in layers)
        _remove_smallest(layers, round(sparsity * total) - sum(_zeros(m) for _, m in layers))
        return
    for item in layers:
        _remove_smallest([item], round(sparsity * item[1].weight.numel()) - _zeros(item[1]))


def _remove_smallest(layers: list[tuple[str, nn.Module]], count: int) -> None:
    """Mask the ``count`` smallest |w| still unmasked across ``layers``, multiplying into the mask
    buffer in place (one mask per layer however often AGP grows it, in the weight's own memory
    format). Ranking is done on flat copies: torch's l1_unstructured/global_unstructured
    ``view(-1)`` the weight, which fails on channels_last."""
    if count <= 0:
        return
    scores = torch.cat(
        [m.weight.detach().abs().reshape(-1).float().masked_fill(m.weight_mask.reshape(-1) == 0, float("inf"))
         for _, m in layers]
    )  # fmt: skip
    drop = torch.zeros_like(scores, dtype=torch.bool)
    drop[torch.topk(scores, count, largest=False).indices] = True
    offset = 0
    for _, m in layers:
        n = m.weight.numel()
        keep = (~drop[offset : offset + n]).reshape(m.weight.shape).to(m.weight_mask.dtype)
        m.weight_mask.mul_(keep)
        offset += n


def finish(layers: list[tuple[str, nn.Module]]) -> None:
    """Make the masks permanent: plain ``weight`` parameters with zeros, no hooks left."""
    for _, m in layers:
        if prune.is_pruned(m):
            prune.remove(m, "weight")


def agp(progress: float, final: float, initial: float, begin: float, end: float) -> float:
    """Zhu & Gupta's cubic schedule: s_t = s_f + (s_i − s_f)(1 − (t − t0)/(t1 − t0))³, held at
    s_i before ``begin`` and at s_f after ``end`` (t in epochs)."""
    if progress <= begin:
        return initial
    if progress >= end:
        return final
    return final + (initial - final) * (1 - (progress - begin) / (end - begin)) ** 3


def layer_sparsity(layers: list[tuple[str, nn.Module]]) -> dict[str, float]:
    """Fraction of exact zeros in each layer's effective weight."""
    return {name: float((m.weight == 0).float().mean()) for name, m in layers}


def overall_sparsity(layers: list[tuple[str, nn.Module]]) -> float:
    total = sum(m.weight.numel() for _, m in layers)
    return sum(int((m.weight == 0).sum()) for _, m in layers) / max(total, 1)


def state_dict_bytes(model: nn.Module) -> tuple[int, int]:
    """(raw, gzip -9) bytes of the saved state dict: what sparsity buys on disk."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    raw = buf.getvalue()
    return len(raw), len(gzip.compress(raw, compresslevel=9, mtime=0))
