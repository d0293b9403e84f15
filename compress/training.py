"""The one training loop (train, distill and prune's fine-tune all use it), readable in a screen.

Fast on CPU because it avoids waste: data is already a tensor on the device, batches are sliced
and augmented as whole tensors, the model runs channels_last under bf16 autocast where the CPU has
native bf16 (measured: ResNet-20 epoch 1.8 -> 0.7 min on this 2-core machine), and evaluation runs
under ``inference_mode``.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from compress import distributed
from compress.context import Context
from compress.data.mixing import Mixing
from compress.errors import CompressError, StageFailed
from compress.files import atomic_save, safe_load

#: what a bad per-epoch resume file's error tells the user to do
REDO_EPOCHS = "delete it to redo that training from its first epoch"


def read_epoch(path: Path, device: Any, *, mmap: bool = False) -> dict[str, Any]:
    """A per-epoch training state (training.fit's resume file), read weights-only."""
    state = safe_load(path, "--resume", device=device, mmap=mmap, hint=REDO_EPOCHS)
    if not isinstance(state, dict) or "epoch" not in state or "model" not in state:
        raise CompressError(f"--resume: {path} is not a training state compress wrote; {REDO_EPOCHS}")
    return state


def load_epoch(path: Path, device: Any, apply: Callable[[dict[str, Any]], None]) -> None:
    """Read ``path`` (see :func:`read_epoch`) into ``apply`` (the training loop's load_state_dict); a
    state that does not fit the loop is one CompressError line too."""
    state = read_epoch(path, device)
    try:
        apply(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
        raise CompressError(
            f"--resume: {path} does not fit this stage's training ({' '.join(lines[:2])}); {REDO_EPOCHS}"
        ) from None


@dataclass
class Batch:
    """One training step's inputs, with what a loss may need beyond images and labels."""

    x: Tensor
    y: Tensor
    index: Tensor  # positions of these images in the training split
    view: int | None  # the replayed augmentation (see DataBundle.train_loader), None if fresh
    epoch: float  # progress in epochs: 0.5 = half-way through the first
    target: Tensor | None = None  # soft labels (N, classes) of a mixed batch (compress.data.mixing); else None

    def labels(self) -> Tensor:
        """What a loss learns from: the soft targets of a mixed batch, else the class indices."""
        return self.y if self.target is None else self.target


LossFn = Callable[[nn.Module, Batch], tuple[Tensor, Tensor]]  # (model, batch) -> (loss, logits)


class OptimConfig(BaseModel):
    """Optimizer, schedule and numerics shared by every stage that trains."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(0.1, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0, le=1)
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_epochs: float = Field(0, ge=0, le=1000)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast dtype; auto = bf16 where the device has native bf16, else fp32"
    )
    channels_last: bool = True
    keep: Literal["last", "best"] = Field(
        "last", description="'best' keeps the epoch with the best test-split top-1 (selection on test data)"
    )


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else None


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def cross_entropy(label_smoothing: float = 0.0) -> LossFn:
    def loss_fn(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        logits = model(batch.x)  # F.cross_entropy smooths soft targets too: (1 - s) * target + s / C
        return F.cross_entropy(logits, batch.labels(), label_smoothing=label_smoothing), logits

    return loss_fn


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Any, device: torch.device, channels_last: bool = False) -> float:
    """Top-1 accuracy in [0, 1], in fp32 whatever a training autocast: the accuracy of the model as it is
    exported and served (under bf16 autocast the digits student read 0.5 pt off)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for x, y in loader:
        logits = model(x.to(device, non_blocking=True).contiguous(memory_format=fmt))
        correct += (logits.argmax(1) == y.to(device)).sum().item()
        total += len(y)
    model.train(was_training)
    return correct / max(total, 1)


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def reestimate_bn(model: nn.Module, loader: Any, device: torch.device, batches: int) -> int:
    """Re-measure every BatchNorm's running statistics on up to ``batches`` batches of ``loader``
    (train mode, no gradients, a cumulative average so every batch counts the same); the model ends
    in eval mode. Returns the batches seen. After pruning, the stored statistics describe the network
    as it was (AdaBN / NetAdapt-style recalibration)."""
    layers = batch_norms(model)
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    seen = 0
    with torch.no_grad():
        for seen, (x, _) in enumerate(loader, start=1):
            model(x.to(device))
            if seen == batches:
                break
    for m, momentum in zip(layers, momenta, strict=True):
        m.momentum = momentum
    model.eval()
    return seen


def _lr_lambda(cfg: OptimConfig, steps_per_epoch: int, epochs: int) -> Callable[[int], float]:
    total = max(1, steps_per_epoch * epochs)
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        t = (step - warm) / max(1, total - warm)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        # one-cycle: linear up to the peak at 30%, then linear down to ~0
        return t / 0.3 if t < 0.3 else max(0.0, (1 - t) / 0.7)

    if cfg.schedule == "onecycle" and warm == 0:
        return lambda step: max(factor(step), 0.04)
    return factor


def fit(
    ctx: Context,
    model: nn.Module,
    loss_fn: LossFn,
    epochs: int,
    cfg: OptimConfig,
    label: str,
    after_step: Callable[[float], None] | None = None,
    aux: nn.Module | None = None,
    views: int | None = None,
    loaders: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place for ``epochs``; return metrics. Raises StageFailed on NaN/Inf loss.

    ``after_step(progress_in_epochs)`` runs after every optimizer step (AGP grows masks there).
    ``aux`` holds trainable parts of the loss (FitNets regressors), optimized with the model and
    discarded afterwards; ``views`` is passed to the train loader (replayed augmentations).
    ``loaders`` = (train, test) replaces ``ctx.data``'s (the Python API trains on any batches):
    train as :class:`TensorLoader` (``batches()``, ``set_epoch``, ``view``, ``len``), test any
    iterable of (images, labels) or None (test_acc is then NaN).
    """
    loop = _Training.setup(ctx, model, loss_fn, cfg, epochs, after_step, aux, views, loaders)
    start = time.perf_counter()
    # After every epoch the whole training state is saved atomically; a resumed run (the file only
    # survives an interrupted process) continues from the last finished epoch, bit for bit.
    resume_file = ctx.next_resume_file()
    if resume_file.is_file():
        load_epoch(resume_file, ctx.device, loop.load_state_dict)
        ctx.log.info("%s: resumed after epoch %d/%d", label, loop.epoch, epochs)
    steps = len(loop.loader)
    with ctx.progress() as prog:
        task = prog.add_task(label, total=epochs * steps, info="")
        prog.advance(task, loop.epoch * steps)
        for epoch in range(loop.epoch, epochs):
            epoch_start = time.perf_counter()
            train_loss, train_acc = loop.train_epoch(epoch, lambda: prog.advance(task))
            if not math.isfinite(train_loss):
                raise StageFailed(
                    f"{label}: loss became {train_loss} in epoch {epoch + 1}; lower the lr "
                    f"(now {cfg.lr}) or use precision: fp32"
                )
            row = loop.end_epoch(train_loss, train_acc, loop.evaluate(), time.perf_counter() - epoch_start)
            prog.update(task, info=f"epoch {loop.epoch}/{epochs} loss {train_loss:.3f} acc {row['test_acc']:.3f}")
            _report_epoch(ctx, label, row, epochs, time.perf_counter() - start)
            if ctx.is_main:
                atomic_save(loop.state_dict(), resume_file)
    return loop.result(epochs, start)


def _report_epoch(ctx: Context, label: str, row: dict[str, float], epochs: int, elapsed: float) -> None:
    """The epoch's line in train.log; also on the console when no live progress bar shows there
    (CI, nohup, ``| tee``: stderr is not a terminal), so a long stage never looks hung."""
    ctx.log.info(
        "%s epoch %d/%d loss %.4f train_acc %.4f test_acc %.4f",
        label,
        row["epoch"],
        epochs,
        row["train_loss"],
        row["train_acc"],
        row["test_acc"],
    )
    if ctx.quiet or ctx.console.is_interactive or ctx.console.is_jupyter:
        return
    stage = f"stage {ctx.stage_index} " if ctx.stage_index else ""
    ctx.console.print(
        f"{stage}{label}: epoch {row['epoch']}/{epochs} loss {row['train_loss']:.4f} "
        f"train_acc {row['train_acc']:.4f} test_acc {row['test_acc']:.4f} "
        f"({row['seconds']:.1f}s, {dt.timedelta(seconds=round(elapsed))} elapsed)",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


@dataclass
class _Training:
    """One ``fit`` call's moving parts; ``state_dict()`` is what its resume file holds after an epoch."""

    ctx: Context
    model: nn.Module
    trained: nn.Module  # what the steps call: DDP around the model under torchrun, else the model
    aux: nn.Module
    aux_params: list[nn.Parameter]  # DDP averages the model's gradients, not these
    loss_fn: LossFn
    cfg: OptimConfig
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    loader: Any
    test_loader: Any | None
    dtype: torch.dtype | None
    after_step: Callable[[float], None] | None
    mixing: Mixing | None = None  # the data's mixup/cutmix, applied to every training batch; never in evaluation
    history: list[dict[str, float]] = field(default_factory=list)
    best_acc: float = -1.0
    best_state: dict[str, Tensor] | None = None
    epoch: int = 0  # epochs finished

    @classmethod
    def setup(
        cls,
        ctx: Context,
        model: nn.Module,
        loss_fn: LossFn,
        cfg: OptimConfig,
        epochs: int,
        after_step: Callable[[float], None] | None,
        aux: nn.Module | None,
        views: int | None,
        loaders: tuple[Any, Any] | None = None,
    ) -> _Training:
        device = ctx.device
        model.to(device=device, memory_format=_memory_format(cfg)).train()
        aux = aux if aux is not None else nn.Module()
        aux.to(device).train()
        aux_params = [p for p in aux.parameters() if p.requires_grad]
        params = [p for p in model.parameters() if p.requires_grad] + aux_params
        opt = torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
        mixing = None
        if loaders is not None:
            loader, test_loader = loaders
        else:
            loader = ctx.data.train_loader(seed=ctx.recipe.seed, rank=ctx.rank, world=ctx.world, views=views)
            test_loader = ctx.data.eval_loader("test")
            mixing = Mixing.of(ctx.data, ctx.recipe.seed)
        trained = distributed.wrap(model, device)  # DDP averages gradients across ranks; else the model
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, len(loader), epochs))
        return cls(
            ctx=ctx,
            model=model,
            trained=trained,
            aux=aux,
            aux_params=aux_params,
            loss_fn=loss_fn,
            cfg=cfg,
            opt=opt,
            sched=sched,
            loader=loader,
            test_loader=test_loader,
            dtype=autocast_dtype(cfg.precision, device),
            after_step=after_step,
            mixing=mixing,
        )

    def train_epoch(self, epoch: int, advance: Callable[[], None]) -> tuple[float, float]:
        """One pass over this rank's shard: (mean loss, top-1) over every rank's."""
        device, loader, fmt = self.ctx.device, self.loader, _memory_format(self.cfg)
        loader.set_epoch(epoch)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        view = loader.view()
        for step, (x, y, idx) in enumerate(loader.batches()):
            x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
            y = y.to(device, non_blocking=True)
            batch = Batch(x, y, idx, view, epoch + step / len(loader))
            if self.mixing is not None:  # a function of (seed, epoch, step): resumed runs mix the same
                batch.x, batch.target = self.mixing(x, y, epoch, step)
            loss, logits = self.step(batch)
            if self.after_step is not None:
                self.after_step(epoch + (step + 1) / len(loader))  # progress in epochs
            loss_sum += loss.detach() * len(y)
            hit = y if batch.target is None else batch.target.argmax(1)  # mixed: the dominant image's label
            correct += (logits.detach().argmax(1) == hit).sum()
            seen += len(y)
            advance()
        seen_t = torch.tensor(seen, device=device)
        distributed.all_reduce_sum(loss_sum, correct, seen_t)  # metrics over every rank's shard
        seen = int(seen_t.item())
        return loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1)

    def step(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """One optimizer step; (loss, logits)."""
        with _autocast(self.ctx.device, self.dtype):
            loss, logits = self.loss_fn(self.trained, batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(self.aux_params)
        self.opt.step()
        self.sched.step()
        return loss, logits

    def evaluate(self) -> float:
        """The epoch's top-1 (fp32, as every stage's): the history and the best-epoch choice agree with them."""
        if self.test_loader is None:
            return math.nan
        return evaluate(self.model, self.test_loader, self.ctx.device, self.cfg.channels_last)

    def end_epoch(self, train_loss: float, train_acc: float, test_acc: float, seconds: float) -> dict[str, float]:
        """Record the epoch just trained (and keep its weights if it is the best so far); its row."""
        self.epoch += 1
        row = {
            "epoch": self.epoch,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "test_acc": test_acc,
            "lr": self.opt.param_groups[0]["lr"],
            "seconds": seconds,  # training steps + test evaluation
        }
        self.history.append(row)
        if self.cfg.keep == "best" and test_acc > self.best_acc:
            self.best_acc = test_acc
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return row

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "aux": self.aux.state_dict(),
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "history": self.history,
            "best_acc": self.best_acc,
            "best_state": self.best_state,
            "rng": torch.get_rng_state(),
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.model.load_state_dict(saved["model"])
        self.aux.load_state_dict(saved.get("aux", {}))  # absent in files from before aux existed
        self.opt.load_state_dict(saved["opt"])
        self.sched.load_state_dict(saved["sched"])
        self.history, self.best_acc, self.best_state = saved["history"], saved["best_acc"], saved["best_state"]
        self.epoch = saved["epoch"]
        torch.set_rng_state(saved["rng"])

    def result(self, epochs: int, start: float) -> dict[str, Any]:
        """Load the kept weights (``keep: best``), leave the model contiguous in eval mode; fit's metrics."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self.model.to(memory_format=torch.contiguous_format).eval()
        last = self.history[-1] if self.history else {}
        return {
            "epochs": epochs,
            "seconds": time.perf_counter() - start,
            "train_loss": last.get("train_loss"),
            "test_acc": self.best_acc if self.best_state is not None else last.get("test_acc"),
            "precision": str(self.dtype).removeprefix("torch.") if self.dtype else "fp32",
            "history": self.history,
        }


def _memory_format(cfg: OptimConfig) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format
