"""Layers torch-pruning's tracer cannot see through, handed to it as customized layers (its
``customized_pruners`` API): each is one node of the dependency graph, and its pruner says which
of its tensors a removed channel touches.

- torchvision Swin (V1/V2): ``ShiftedWindowAttention`` partitions windows with 6-D views and
  permutes, and ``PatchMerging`` concatenates four strided slices. Traced op by op, torch-pruning's
  reshape rule chains flatten index mappings whose strides multiply (one channel becomes millions
  of indices: a 64×64 swin_t grew past 20 GB). As single nodes they are exact and cheap: the
  attention's q/k/v and output projection follow the residual width (torchvision computes the head
  width as ``C // num_heads``, so every width stays a multiple of the head count), the merge's
  reduction reads each input channel at four offsets (as Torch-Pruning's own Swin example does).
- torchvision ShuffleNetV2: the channel shuffle (view → transpose → view) is a permutation that
  torch-pruning's reshape rule cannot follow (a ZeroDivisionError). While the graph is traced
  (:func:`traceable`) each block computes it through a :class:`ChannelShuffle` module, whose
  dependencies carry the permutation (:func:`install_mappings`). After pruning the model is plain
  torchvision again: only the tensors shrank.
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch_pruning as tp
from torch import nn
from torchvision.models import shufflenetv2, swin_transformer

_fn = tp.pruner.function
_HybridIndex = tp._helpers._HybridIndex  # (index, index in the root layer): what index mappings pass on


class SwinAttentionPruner(tp.BasePruningFunc):
    """torchvision ``ShiftedWindowAttention(V2)``: input and output are the residual stream (one
    width C, coupled), q/k/v rows come in three blocks of C. Per-head tensors (relative position
    bias, V2's logit scale and bias MLP) do not depend on C."""

    def check(self, layer: nn.Module, idxs: Sequence[int], to_output: bool) -> None:
        left = layer.qkv.in_features - len(idxs)
        assert left % layer.num_heads == 0, f"width {left} of a Swin attention must divide by {layer.num_heads} heads"

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        dim = layer.qkv.in_features
        _fn.prune_linear_in_channels(layer.qkv, idxs)
        _fn.prune_linear_out_channels(layer.qkv, [i + k * dim for k in range(3) for i in idxs])
        _fn.prune_linear_in_channels(layer.proj, idxs)
        _fn.prune_linear_out_channels(layer.proj, idxs)
        return layer

    prune_in_channels = prune_out_channels  # one width: in and out are coupled

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.proj.out_features

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.qkv.in_features


class PatchMergingPruner(tp.BasePruningFunc):
    """torchvision ``PatchMerging(V2)``: four strided slices of C channels concatenated, a Linear
    4C → 2C, a LayerNorm before (V1, over 4C) or after (V2, over 2C)."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        _fn.prune_linear_out_channels(layer.reduction, idxs)
        if isinstance(layer, swin_transformer.PatchMergingV2):
            _fn.prune_layernorm_out_channels(layer.norm, idxs)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        dim = layer.reduction.in_features // 4
        every = [i + k * dim for k in range(4) for i in idxs]
        _fn.prune_linear_in_channels(layer.reduction, every)
        if isinstance(layer, swin_transformer.PatchMerging):
            _fn.prune_layernorm_out_channels(layer.norm, every)
        layer.dim = dim - len(idxs)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.reduction.out_features

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.reduction.in_features // 4


class ChannelShuffle(nn.Module):
    """``channel_shuffle(x, groups)`` as a module, so the tracer sees one node; it remembers the
    width it last saw (torch-pruning asks a parameter-free layer for it)."""

    def __init__(self, groups: int, channels: int) -> None:
        super().__init__()
        self.groups, self.channels = groups, channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.channels = x.shape[1]
        return shufflenetv2.channel_shuffle(x, self.groups)


class ShufflePruner(tp.BasePruningFunc):
    """Nothing to cut in a shuffle; it only keeps its width current for the index mappings. In and
    out are one function (coupled), so indices reaching it are always in output order; the
    mappings on its input edges translate (see :class:`_ShuffleMapping`)."""

    def prune_out_channels(self, layer: ChannelShuffle, idxs: Sequence[int]) -> nn.Module:
        layer.channels -= len(idxs)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: ChannelShuffle) -> int:
        return layer.channels

    get_in_channels = get_out_channels


class _ShuffleMapping:
    """Indices across a shuffle of g groups of n = C/g channels: input a·n + r is output r·g + a.

    A pruned shuffle must still be a shuffle, so position r goes in every group at once (input
    r, n + r, ...; output r·g ... r·g + g - 1); and ShuffleNet splits the output in two halves
    (the next block's identity and branch), which must lose equally many, so r goes with
    r ± n/2 as well. Each index maps to its whole class: pruning whole classes keeps both rules."""

    def __init__(self, layer: ChannelShuffle, to_input: bool) -> None:
        self.layer, self.to_input = layer, to_input

    def __call__(self, idxs: list) -> list:
        g = self.layer.groups
        n = self.layer.channels // g
        root: dict[int, int] = {}
        for i in idxs:
            r = i.idx // g  # output order in, as the shuffle's prune functions see it
            for pos in {r, (r + n // 2) % n} if n % 2 == 0 else {r}:
                for a in range(g):
                    k = a * n + pos if self.to_input else pos * g + a
                    root[k] = min(root.get(k, i.root_idx), i.root_idx)
        # canonical (sorted, lowest root): torch-pruning stops revisiting an edge only when the
        # same list comes back, and the edges around a shuffle form cycles
        return [_HybridIndex(idx=k, root_idx=root[k]) for k in sorted(root)]


class _InputToOutput(_ShuffleMapping):
    """Concat-side indices (input order) arriving at the shuffle, into output order."""

    def __call__(self, idxs: list) -> list:
        g = self.layer.groups
        n = self.layer.channels // g
        as_output = [_HybridIndex(idx=(i.idx % n) * g + i.idx // n, root_idx=i.root_idx) for i in idxs]
        return super().__call__(as_output)


def _shuffled_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``InvertedResidual.forward`` with the shuffle as ``self.shuffle``."""
    if self.stride == 1:
        half = x.shape[1] // 2  # split, not chunk: torch-pruning reads the sizes off split_with_sizes
        x1, x2 = torch.split(x, [half, x.shape[1] - half], dim=1)
        out = torch.cat((x1, self.branch2(x2)), dim=1)
    else:
        out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
    return self.shuffle(out)


class _Opaque(torch.autograd.Function):
    """The layer's own forward, recorded as one autograd node whose only input is the layer's
    input: torch-pruning's tracer walks autograd from a layer's output, so without this it would
    walk into the layer's ops (the very reshapes it cannot follow). Used only while tracing."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, run) -> torch.Tensor:  # noqa: ANN001 - the layer's bound forward
        return run(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205
        raise RuntimeError("an opaque layer is for tracing the dependency graph only")


def _opaque_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _Opaque.apply(x, type(self).forward.__get__(self))


@contextmanager
def traceable(model: nn.Module) -> Iterator[None]:
    """While tracing: every ShuffleNetV2 block shuffles through a :class:`ChannelShuffle` module
    (same function), and each customized layer is one autograd node. On exit the model is as it
    was (plain torchvision); the shuffle modules live on in the dependency graph that traced them."""
    blocks = [m for m in model.modules() if type(m) is shufflenetv2.InvertedResidual]
    for block in blocks:
        width = block.branch2[-3].out_channels * 2  # the concat: two halves of branch2's width
        block.add_module("shuffle", ChannelShuffle(2, width))
        block.forward = types.MethodType(_shuffled_forward, block)
    kinds = tuple(customized_pruners())
    opaque = [m for m in model.modules() if isinstance(m, kinds)]
    for m in opaque:
        m.forward = types.MethodType(_opaque_forward, m)
    try:
        yield
    finally:
        for m in opaque:
            del m.forward
        for block in blocks:
            del block.forward
            del block._modules["shuffle"]


def customized_pruners() -> dict[type, tp.BasePruningFunc]:
    """The layer types above, with their pruners."""
    swin, merge = SwinAttentionPruner(), PatchMergingPruner()
    return {
        swin_transformer.ShiftedWindowAttention: swin,
        swin_transformer.ShiftedWindowAttentionV2: swin,
        swin_transformer.PatchMerging: merge,
        swin_transformer.PatchMergingV2: merge,
        ChannelShuffle: ShufflePruner(),
    }


def install_mappings(graph: tp.DependencyGraph) -> None:
    """Give each shuffle's input edges the permutation (torch-pruning leaves them identity)."""
    for module, node in graph.module2node.items():
        if not isinstance(module, ChannelShuffle):
            continue
        for dep in node.dependencies:  # shuffle → the concat feeding it: output order to input order
            if dep.target in node.inputs:
                dep.index_mapping[0] = _ShuffleMapping(module, to_input=True)
        for in_node in node.inputs:  # the concat → shuffle: input order to output order
            for dep in in_node.dependencies:
                if dep.target is node:
                    dep.index_mapping[0] = _InputToOutput(module, to_input=False)


def head_counts_for_rounding(model: nn.Module) -> list[int]:
    """Head counts of Swin attention layers: widths must stay multiples of them."""
    kinds = (swin_transformer.ShiftedWindowAttention, swin_transformer.ShiftedWindowAttentionV2)
    return [m.num_heads for m in model.modules() if isinstance(m, kinds)]


def logit_layers(graph: tp.DependencyGraph, root_types: Sequence[type]) -> list[nn.Module]:
    """The layers whose outputs are the model's outputs: walking back from the graph's last nodes
    through layers that keep channels as they are (activations, pooling, flatten, norms, dropout)
    to the first layer that makes channels (a Conv, a Linear, a customized layer), whatever its
    type: squeezenet's classifier is a 1×1 Conv."""
    makers = tuple(root_types) + tuple(graph.CUSTOMIZED_PRUNERS)
    nodes = list(graph.module2node.values())
    queue = [n for n in nodes if not n.outputs]
    seen: set[int] = set()
    found: dict[int, nn.Module] = {}
    while queue:
        node = queue.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node.module, makers):
            found[id(node.module)] = node.module
            continue
        queue.extend(node.inputs)
    return list(found.values())
