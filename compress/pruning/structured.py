"""Structured (channel) pruning over torch-pruning's DependencyGraph: options, one pruning step,
and a search for the ratio that meets a MACs or parameter budget.

Coupled layers (a residual add, a concat, a channel split, a BN after a conv, attention's q/k/v)
are found by tracing, so removing a channel removes it everywhere it flows and the tensors really
shrink. The classifier (the layers making the logits, found in the graph) is never pruned. Layers
the tracer cannot follow (Swin's attention and patch merging, ShuffleNet's channel shuffle) are
customized layers: compress/pruning/layers.py.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import math
from collections.abc import Callable
from typing import Literal, TypeVar

import torch
import torch_pruning as tp
from pydantic import BaseModel, Field, field_validator
from torch import nn

from compress.checkpoint import sync_attributes
from compress.errors import CompressError, StageFailed
from compress.importance import IMPORTANCES
from compress.models.attention import SelfAttention, decouple_attention
from compress.pruning import budget, layers
from compress.pruning.explain import explain

T = TypeVar("T")
#: (heads per attention layer at the start of a schedule, a pruner's first step, the schedule's steps)
HeadPlan = tuple[dict[str, int], int, int]


def count(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(MACs, params) of one forward pass on ``example``, via torch-pruning's op counter."""
    macs, params = tp.utils.count_ops_and_params(model, example)
    return int(macs), int(params)


def _self_attention_macs(module: SelfAttention, inputs: tuple, output) -> None:
    """torch-pruning's count for nn.MultiheadAttention, written for separable heads (so a model
    counts the same before and after ``decouple_attention``): projections, q scaling, q·kᵀ,
    softmax, attention·v, output projection."""
    x = inputs[0] if module.batch_first else inputs[0].transpose(0, 1)
    b, n, embed = x.shape
    inner = module.num_heads * module.head_dim
    bias = module.qkv.bias is not None
    macs = n * inner + 3 * n * embed * inner + bias * 3 * n * inner
    macs += module.num_heads * (2 * n * n * module.head_dim + n * n)
    macs += n * embed * (inner + 1)
    module.__flops__ += int(macs * b)


tp.utils.op_counter.MODULES_MAPPING[SelfAttention] = _self_attention_macs


class StructuredOptions(BaseModel):
    """How channels are chosen: shared by the prune stage and ``compress analyze sensitivity``."""

    method: str = Field("l1", description="importance criterion (compress list)")
    global_pruning: bool = Field(False, description="rank channels across layers instead of per layer")
    ratios: dict[str, float] = Field(
        default_factory=dict,
        description="per-layer channel ratios by module-name pattern (fnmatch), overriding the stage's",
    )
    max_ratio: float = Field(
        0.9, gt=0, lt=1, description="cap on any layer's ratio (uniform and per-layer; not global ranking)"
    )
    round_to: int | None = Field(None, ge=1, le=1024, description="keep channel counts a multiple of this")
    ignore: list[str] = Field(default_factory=list, description="module-name patterns never pruned (fnmatch)")
    taylor_batches: int = Field(4, ge=1, le=10_000, description="training batches of gradients for 'taylor'")
    head_ratio: float = Field(
        0.0, ge=0, lt=1, description="fraction of attention heads removed whole (per block, or overall when global)"
    )

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:  # (pydantic keys validators by name: keep them unique)
        if v not in IMPORTANCES:
            raise ValueError(IMPORTANCES.unknown_message(v))
        return v

    @field_validator("ratios")
    @classmethod
    def _ratios_in_range(cls, v: dict[str, float]) -> dict[str, float]:
        for pattern, r in v.items():
            if not 0 <= r < 1:
                raise ValueError(f"ratio of {pattern!r} must be in [0, 1), got {r}")
        return v

    def check_patterns(self, model: nn.Module, field: str) -> None:
        """A pattern that matches no module is a typo: say so, with close names."""
        names = [n for n, _ in model.named_modules() if n]
        for key, patterns in (("ignore", self.ignore), ("ratios", list(self.ratios))):
            for pattern in patterns:
                if not any(fnmatch.fnmatch(n, pattern) for n in names):
                    close = difflib.get_close_matches(pattern, names, n=3)
                    hint = f"; did you mean {', '.join(close)}?" if close else ""
                    raise CompressError(f"{field}.{key}: pattern {pattern!r} matches no module of the student{hint}")

    def check_heads(self, model: nn.Module, field: str) -> None:
        """``head_ratio`` needs attention layers whose heads can be separated, and must leave one."""
        if not self.head_ratio:
            return
        heads = head_counts(model)
        if not heads:
            raise CompressError(f"{field}.head_ratio: the student has no attention layer (nn.MultiheadAttention)")
        for name, n in heads.items():
            if round(self.head_ratio * n) >= n:
                raise CompressError(f"{field}.head_ratio: {self.head_ratio} would remove all {n} heads of {name!r}")
        try:
            decouple_attention(copy.deepcopy(model))
        except CompressError as exc:
            raise CompressError(f"{field}.head_ratio: {exc}") from None

    def ignored(self, model: nn.Module, num_classes: int, graph: tp.DependencyGraph) -> list[nn.Module]:
        """The classifier plus the ``ignore`` patterns, each with its submodules (as torch-pruning
        expands them). The classifier is every layer making the logits in ``graph`` (a Linear, a
        1×1 Conv, ...) and any Linear with ``num_classes`` outputs (an auxiliary head off the
        traced path, e.g. GoogLeNet's in eval mode)."""
        named = dict(model.named_modules())
        roots = layers.logit_layers(graph, ROOT_TYPES)
        roots += [m for m in named.values() if isinstance(m, nn.Linear) and m.out_features == num_classes]
        for pattern in self.ignore:
            roots.extend(m for n, m in named.items() if n and fnmatch.fnmatch(n, pattern))
        return list({id(sub): sub for m in roots for sub in m.modules()}.values())

    def overrides(self, model: nn.Module, scale: Callable[[float], float] = lambda r: r) -> dict[nn.Module, float]:
        """``ratios`` as torch-pruning's per-module dict; a later pattern wins over an earlier one."""
        named = dict(model.named_modules())
        out: dict[nn.Module, float] = {}
        for pattern, r in self.ratios.items():
            for n, m in named.items():
                if n and fnmatch.fnmatch(n, pattern):
                    out.pop(m, None)  # re-insert: torch-pruning reads the dict in order
                    out[m] = scale(r)
        return out

    def check_overrides(self, model: nn.Module, example: torch.Tensor, num_classes: int, field: str) -> None:
        """torch-pruning applies one ratio per coupled group (a residual stage is one group): two
        different ``ratios`` for layers of one group would silently keep only one of them."""
        if not self.ratios:
            return
        wanted = self.overrides(model)
        names = {m: n for n, m in model.named_modules()}
        for group in groups(model, example, self, num_classes):
            # the layers whose outputs this group's channels are (another group's root appears here too,
            # as a consumer of these channels: its ratio is its own group's, not a conflict)
            outs = {dep.target.module for dep, _ in group if getattr(dep.handler, "__name__", "") == OUT}
            asked = {names[m]: wanted[m] for m in outs if m in wanted}
            if len(set(asked.values())) > 1:
                pairs = ", ".join(f"{n}: {r}" for n, r in sorted(asked.items()))
                raise CompressError(
                    f"{field}.ratios: layers of one coupled group (pruned together) get different ratios ({pairs}); "
                    "give them one ratio"
                )

    def pruner(
        self,
        model: nn.Module,
        example: torch.Tensor,
        ratio: float,
        num_classes: int,
        scale: Callable[[float], float] = lambda r: r,
        steps: int = 1,
        head_plan: HeadPlan | None = None,
    ) -> tp.pruner.BasePruner:
        """A torch-pruning pruner removing ``ratio`` of the channels (per layer, or overall when
        global) in ``steps`` calls of ``step()``, each a linear share of the original channel
        counts. ``scale`` maps a per-layer override to this pruner's share of it. With
        ``head_ratio``, ``head_plan`` = (heads per attention layer at the start of the schedule,
        this pruner's first step, the schedule's steps); by default the schedule is this pruner's."""
        # Removing whole heads needs attention whose head count is its own dimension: every
        # nn.MultiheadAttention becomes a SelfAttention (same function), and torch-pruning ranks
        # heads by their q/k/v rows. Head widths are then kept; `ratio` prunes the rest (MLP, embedding).
        if self.head_ratio:
            decouple_attention(model)
        separable = {m.qkv: m.num_heads for m in model.modules() if isinstance(m, SelfAttention)}
        # An nn.MultiheadAttention keeps its heads; its width (every head's dims together) must stay
        # divisible by the head count. (Telling torch-pruning num_heads stops it pruning that width.)
        heads = [m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
        heads += layers.head_counts_for_rounding(model)  # Swin: head width = width // heads
        round_to = self.round_to
        if heads and round_to is None:
            round_to = math.lcm(*heads)
        ignored = self.ignored(model, num_classes, trace(model, example))
        with layers.traceable(model):
            pruner = tp.pruner.BasePruner(
                model,
                example,
                importance=IMPORTANCES.get(self.method)(),
                pruning_ratio=ratio,
                # torch-pruning visits a group's heads only when the group has channels to prune: give the
                # q/k/v layers a ratio of their own (their head widths stay; prune_head_dims is off)
                pruning_ratio_dict={**self.overrides(model, scale), **dict.fromkeys(separable, self.head_ratio)}
                or None,
                max_pruning_ratio=self.max_ratio,
                global_pruning=self.global_pruning,
                ignored_layers=ignored,
                customized_pruners=layers.customized_pruners(),
                round_to=round_to,
                iterative_steps=steps,
                num_heads=separable,
                prune_num_heads=bool(self.head_ratio),
                prune_head_dims=not self.head_ratio,
                head_pruning_ratio=self.head_ratio,  # its schedule is replaced by an exact one below
            )
        layers.install_mappings(pruner.DG)
        if self.head_ratio:
            start, first, total = head_plan or (head_counts(model), 1, steps)
            self._schedule_heads(pruner, model, start, range(first, first + steps), total)
        return pruner

    def _schedule_heads(
        self, pruner: tp.pruner.BasePruner, model: nn.Module, start: dict[str, int], ks: range, total: int
    ) -> None:
        """After step k of ``total``, round(head_ratio · k/total) of the starting heads are gone,
        exactly. torch-pruning's own iterative head schedule compounds (each step removes
        ceil(cumulative ratio × heads left) per layer); its per-step ratios are set here so that
        its rounding (ceil per layer, floor of the kept total when global) lands on our counts."""
        now = head_counts(model)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, SelfAttention)}
        eps = 1e-6
        if self.global_pruning:
            t0, cur = sum(start.values()), sum(now.values())  # torch-pruning keeps int(cur · (1 - r_k))
            wanted = [t0 - round(self.head_ratio * t0 * k / total) for k in ks]
            pruner.per_step_head_pruning_ratio = [0.0] + [(cur - w - eps) / cur for w in wanted]
            return
        for name, layer in layers.items():
            prev, shares = now[name], [0.0]
            for k in ks:
                left = start[name] - round(self.head_ratio * start[name] * k / total)
                shares.append((prev - left - eps) / prev if prev > left else 0.0)  # ceil(share · prev) = prev - left
                prev = left
            pruner.head_pruning_ratio_dict[layer.qkv] = shares


OUT = "prune_out_channels"  # torch-pruning's handler name for a layer whose outputs a group's channels are
ROOT_TYPES = [tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR, tp.ops.TORCH_LSTM]  # BasePruner's default


def trace(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of ``model``, with the layers it cannot trace through as
    customized layers (compress.pruning.layers)."""
    with layers.traceable(model):
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs=example, customized_pruners=layers.customized_pruners()
        )
    layers.install_mappings(graph)
    return graph


def groups(model: nn.Module, example: torch.Tensor, opts: StructuredOptions, num_classes: int) -> list:
    """The prunable dependency groups, as BasePruner sees them (same ignored layers, root types)."""
    graph = trace(model, example)
    return list(
        graph.get_all_groups(ignored_layers=opts.ignored(model, num_classes, graph), root_module_types=ROOT_TYPES)
    )


def group_roots(model: nn.Module, example: torch.Tensor, opts: StructuredOptions, num_classes: int) -> list[str]:
    """Names of the layers that root the prunable groups: one per set of coupled channels."""
    names = {m: n for n, m in model.named_modules() if n}
    roots: list[str] = []
    for group in groups(model, example, opts, num_classes):
        name = names.get(group[0].dep.target.module)
        if name and name not in roots:
            roots.append(name)
    return roots


def accumulate_gradients(model: nn.Module, loader, device: torch.device, batches: int) -> None:
    """∂L/∂w (cross-entropy) summed over ``batches`` batches into ``.grad``, for criteria that read
    gradients; eval mode, so BatchNorm statistics are not touched."""
    model.eval().zero_grad(set_to_none=True)
    for i, (x, y, _) in enumerate(loader.batches()):
        if i == batches:
            break
        torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()


def head_counts(model: nn.Module) -> dict[str, int]:
    """Heads of every attention layer (nn.MultiheadAttention or SelfAttention), by name."""
    return {n: m.num_heads for n, m in model.named_modules() if isinstance(m, (nn.MultiheadAttention, SelfAttention))}


def prune_step(
    model: nn.Module,
    example: torch.Tensor,
    opts: StructuredOptions,
    ratio: float,
    num_classes: int,
    scale=lambda r: r,
    head_plan: HeadPlan | None = None,
) -> None:
    """Prune ``model`` in place, in one step."""
    build = lambda: opts.pruner(model, example, ratio, num_classes, scale, head_plan=head_plan)  # noqa: E731
    guarded(model, lambda: build().step(), example)


def guarded(model: nn.Module, action: Callable[[], T], example: torch.Tensor | None = None) -> T:
    """Run a torch-pruning action on ``model``, make the modules' hyper-parameters agree with their
    shrunken tensors, and (given ``example``) check the pruned model still runs. Any failure is
    one line naming the layer. Returns what ``action`` returned."""
    cap = None
    try:
        with torch.random.fork_rng(devices=[]), budget.capped() as cap:
            torch.manual_seed(0)  # 'random' importance: the same draw for a trial copy and the real prune
            result = action()
    except Exception as exc:  # noqa: BLE001 - torch-pruning raises anything; we name the layer
        name = type(model).__name__
        if cap is not None and budget.is_out_of_memory(exc):
            raise StageFailed(
                f"prune: torch-pruning needed more than its {cap / budget.GIB:.1f} GiB memory budget to trace "
                f"{name} (its reshapes multiply index mappings; {explain(exc, model)}): refused rather than let "
                "it eat the machine; ignore the layers around there, or set COMPRESS_PRUNE_MEMORY_GB"
            ) from None
        raise StageFailed(f"prune: torch-pruning cannot prune {name}: {explain(exc, model)}") from exc
    sync_attributes(model)
    if example is not None:
        try:
            with torch.no_grad():
                model(example)
        except Exception as exc:  # noqa: BLE001
            raise StageFailed(
                f"prune: the pruned {type(model).__name__} no longer runs {explain(exc, model)} "
                "(a width the layer needs divisible by something? set round_to, or ignore the layer)"
            ) from exc
    return result


def pruned_copy(
    model: nn.Module,
    example: torch.Tensor,
    opts: StructuredOptions,
    ratio: float,
    num_classes: int,
    scale=lambda r: r,
    head_plan: HeadPlan | None = None,
) -> nn.Module:
    """A pruned deep copy (gradients copied too, for criteria that read them); ``model`` untouched."""
    twin = copy.deepcopy(model)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for n, p in twin.named_parameters():
        if n in grads:
            p.grad = grads[n].clone()
    prune_step(twin, example, opts, ratio, num_classes, scale, head_plan)
    return twin


def search_ratio(
    model: nn.Module,
    example: torch.Tensor,
    opts: StructuredOptions,
    budget: int,
    metric: Literal["macs", "params"],
    num_classes: int,
    scale: Callable[[float], float] = lambda r: r,
    iters: int = 12,
    head_plan: HeadPlan | None = None,
) -> tuple[float, int]:
    """The smallest channel ratio whose pruned model has at most ``budget`` MACs (or params), by
    bisection on pruned copies: (ratio, achieved). Overrides keep their ratios; the search scales
    the rest, and whole heads go as ``head_ratio`` says. Fails in one line when no ratio up to
    ``max_ratio`` meets the budget.

    Size is not monotonic in the ratio near the top: with ``round_to``, a layer whose rounded width
    would reach zero is left whole (a 16-channel stage with ``round_to: 8`` at ratio 0.9 keeps all
    16), so the bracket comes from a coarse ascending scan, not from ``max_ratio`` alone."""
    pick = 0 if metric == "macs" else 1

    def size(r: float) -> int:
        return count(pruned_copy(model, example, opts, r, num_classes, scale, head_plan), example)[pick]

    lo, hi, at_hi, smallest = 0.0, None, None, None
    for k in range(1, 9):
        r = opts.max_ratio * k / 8
        got = size(r)
        smallest = min(smallest or (got, r), (got, r))
        if got <= budget:
            hi, at_hi = r, got
            break
        lo = r
    if hi is None or at_hi is None:
        got, r = smallest  # type: ignore[misc]
        raise StageFailed(
            f"prune: no ratio up to max_ratio {opts.max_ratio} meets the target {budget:,} {metric} (smallest: "
            f"{got:,} at ratio {r:.3g}); raise max_ratio, prune globally, lower round_to or the ignore list"
        )
    best = (hi, at_hi)
    for _ in range(iters):
        mid = (lo + hi) / 2
        got = size(mid)
        if got <= budget:
            hi, best = mid, (mid, got)
        else:
            lo = mid
        if got <= budget and budget - got < 0.002 * budget:
            break
    return best
