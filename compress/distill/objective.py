"""The distillation objective: teachers (frozen, eval, inference mode), feature taps, weighted terms.

``with DistillObjective(...) as objective: fit(ctx, student, objective, ..., aux=objective.aux)``.
Entering freezes the teachers and installs the forward hooks; leaving removes every hook and gives
the teachers back their train/eval mode and ``requires_grad`` flags.
"""

from __future__ import annotations

from contextlib import ExitStack
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from compress.distill import LossTerm, Outputs
from compress.distill.taps import FeatureTaps
from compress.training import Batch


class TeacherCache:
    """Teacher logits per (augmentation view, training image), filled the first time they are needed.

    Correct only when the image a view shows for an index never changes: no augmentation (one
    view), or augmentations replayed per (view, index), see ``DataBundle.train_loader(views=...)``.
    """

    def __init__(self, views: int, teachers: int, images: int, classes: int, device: torch.device) -> None:
        self.logits = torch.zeros(views, teachers, images, classes, device=device)
        self.filled = torch.zeros(views, images, dtype=torch.bool, device=device)
        self.hits = self.misses = 0

    @staticmethod
    def nbytes(views: int, teachers: int, images: int, classes: int) -> int:
        return views * images * (teachers * classes * 4 + 1)

    def missing(self, view: int, index: Tensor) -> Tensor:
        """Boolean mask over ``index``: which images' logits are not cached yet."""
        return ~self.filled[view, index]

    def get(self, view: int, index: Tensor) -> list[Tensor]:
        return list(self.logits[view][:, index].unbind(0))

    def put(self, view: int, index: Tensor, logits: list[Tensor]) -> None:
        self.logits[view][:, index] = torch.stack([z.float() for z in logits])
        self.filled[view, index] = True


class DistillObjective:
    """Callable ``(student, batch) -> (loss, student logits)`` for :func:`compress.training.fit`."""

    def __init__(
        self,
        student: nn.Module,
        teachers: list[tuple[nn.Module, float]],
        terms: list[LossTerm],
        *,
        example: Tensor,
        combine: str = "average",
        label_smoothing: float = 0.0,
        teacher_dtype: torch.dtype | None = None,
        cache: TeacherCache | None = None,
    ) -> None:
        total = sum(w for _, w in teachers)
        self.teachers = [t for t, _ in teachers]
        self.weights = [w / total for _, w in teachers]
        self.terms, self.combine, self.label_smoothing = terms, combine, label_smoothing
        self.teacher_dtype, self.cache = teacher_dtype, cache
        pairs = [p for term in terms for p in term.layer_pairs()]
        self.student_taps = FeatureTaps(student, [p.student for p in pairs], "student")
        self.teacher_taps = [
            FeatureTaps(t, [p.teacher for p in pairs], f"teacher {k}" if len(teachers) > 1 else "teacher")
            for k, t in enumerate(self.teachers)
        ]
        self._stack: ExitStack | None = None
        self._saved: list[tuple[nn.Module, bool, list[bool]]] = []
        self.aux = nn.ModuleList(self._build(student, example))

    def _build(self, student: nn.Module, example: Tensor) -> list[nn.Module]:
        """One dry forward (eval mode, no grad: BN statistics untouched) to check the taps and size
        the terms' learnable parts."""
        with self:
            was = student.training
            student.eval()
            try:
                with torch.no_grad():
                    student(example)
                    feats_s = dict(self.student_taps.outputs)
                    feats_t = []
                    for teacher, taps in zip(self.teachers, self.teacher_taps, strict=True):
                        teacher(example)
                        feats_t.append(dict(taps.outputs))
            finally:
                student.train(was)
            for taps, feats in ((self.student_taps, feats_s), *zip(self.teacher_taps, feats_t, strict=True)):
                for path in taps.modules:
                    if path not in feats:
                        raise ValueError(f"module {path!r} produced no tensor output in a forward pass")
            for term in self.terms:
                for pair in term.layer_pairs():
                    for side, f in (
                        ("student", feats_s[pair.student]),
                        *(("teacher", ft[pair.teacher]) for ft in feats_t),
                    ):
                        if f.ndim not in term.feature_ndims():
                            path = pair.student if side == "student" else pair.teacher
                            raise ValueError(
                                f"{term.name} needs {' or '.join(f'{n}-D' for n in term.feature_ndims())} outputs, "
                                f"but {side} module {path!r} outputs shape {tuple(f.shape)}"
                            )
            return [term.build(feats_s, feats_t) for term in self.terms]

    # ----------------------------------------------------------------------------- context
    def __enter__(self) -> DistillObjective:
        self._stack = ExitStack()
        self._stack.enter_context(self.student_taps)
        for taps in self.teacher_taps:
            self._stack.enter_context(taps)
        self._saved = [(t, t.training, [p.requires_grad for p in t.parameters()]) for t in self.teachers]
        for t in self.teachers:
            t.eval()
            t.requires_grad_(False)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for t, training, flags in self._saved:
            t.train(training)
            for p, flag in zip(t.parameters(), flags, strict=True):
                p.requires_grad_(flag)
        self._saved = []
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    # ----------------------------------------------------------------------------- the loss
    def teacher_outputs(self, batch: Batch) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        """Teacher logits and captured teacher features; with a cache, the teachers run only on the
        images whose logits are not cached yet (a teacher in eval mode treats images independently)."""
        cache, view = self.cache, batch.view
        if cache is None or view is None or batch.target is not None:  # a mixed image is new every epoch
            return self._run_teachers(batch.x)
        missing = cache.missing(view, batch.index)
        n_missing = int(missing.sum())
        if n_missing:
            z_t, _ = self._run_teachers(batch.x[missing] if n_missing < len(missing) else batch.x)
            cache.put(view, batch.index[missing], z_t)
        cache.misses += n_missing
        cache.hits += len(missing) - n_missing
        return cache.get(view, batch.index), [{} for _ in self.teachers]

    def _run_teachers(self, x: Tensor) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        cast: Any = (
            torch.autocast(x.device.type, dtype=self.teacher_dtype)
            if self.teacher_dtype is not None
            else torch.autocast(x.device.type, enabled=False)
        )
        with torch.inference_mode(), cast:
            z_t = [t(x) for t in self.teachers]
        # Leave inference mode: the losses save these for backward (and autocast gave lower precision).
        z_t = [z.float().clone() for z in z_t]
        feats_t = [{k: v.clone() for k, v in taps.outputs.items()} for taps in self.teacher_taps]
        return z_t, feats_t

    def __call__(self, student: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        out = self.outputs(student, batch)
        loss = sum(term.weight * module(out) for term, module in zip(self.terms, self.aux, strict=True))
        return loss, out.z_s  # type: ignore[return-value]

    def outputs(self, student: nn.Module, batch: Batch) -> Outputs:
        """One step's :class:`Outputs`: the teachers and the student on ``batch.x`` (mixed images
        when the data mixes, so the teachers' soft targets describe the image the student sees)."""
        z_t, feats_t = self.teacher_outputs(batch)
        z_s = student(batch.x)
        return Outputs(
            z_s=z_s,
            z_t=z_t,
            weights=self.weights,
            combine=self.combine,
            y=batch.labels(),  # soft (N, classes) for a mixed batch: F.cross_entropy takes probabilities
            epoch=batch.epoch,
            label_smoothing=self.label_smoothing,
            feats_s=dict(self.student_taps.outputs),
            feats_t=feats_t,
        )

    def soft_label_failure(self, student: nn.Module, x: Tensor, num_classes: int) -> tuple[int, str] | None:
        """(index, reason) of the first term that cannot learn from soft labels (those of mixed images),
        found by computing every term once on ``x`` without gradients (student in eval mode: BN untouched)."""
        target = torch.full((len(x), num_classes), 1.0 / num_classes, device=x.device)
        batch = Batch(x, target.argmax(1), torch.arange(len(x), device=x.device), None, 0.0, target=target)
        was = student.training
        student.eval()
        try:
            with self, torch.no_grad():
                out = self.outputs(student, batch)
                for i, module in enumerate(self.aux):
                    try:
                        module(out)
                    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                        return i, (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        finally:
            student.train(was)
        return None
