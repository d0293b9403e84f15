"""Knowledge distillation as a component a stage holds (``kd:``), and fine-tuning with or without it.

:class:`KD` is the recipe's ``kd:`` block: weighted loss terms (``compress list``), one or several
teachers, teacher-logit caching where that is provably the same value. :class:`FineTune` is a
stage's ``finetune:`` block (prune, sparsify): epochs, ``optim:`` and an optional ``kd:``; when
``kd`` is absent the student fine-tunes on labels alone, so a KD setting can never sit unused.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Annotated, Any, Literal, Union

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, field_validator, model_validator
from torch import nn

from compress.checkpoint import build_from_spec
from compress.config import moved
from compress.context import Context
from compress.data import ImageData
from compress.data.mixing import mixes
from compress.distill import LOSSES, LossTerm
from compress.distill.objective import DistillObjective, TeacherCache
from compress.distill.taps import find_module
from compress.errors import CompressError
from compress.models import ModelSpec, check_model_name
from compress.training import OptimConfig, autocast_dtype, cross_entropy, fit

#: the one-logit-loss shorthand of ``kd:``, spelled out into ``losses:`` before validation
SHORTHAND = ("loss", "temperature", "alpha")

# The recipe's `losses:` entries: a union of the registered terms, told apart by `name`.
LossUnion = Annotated[Union[tuple(LOSSES.get(n) for n in LOSSES.names())], Field(discriminator="name")]  # noqa: UP007


class TeacherRef(ModelSpec):
    """One teacher of a multi-teacher stage: the recipe's ``teacher`` or a model with a checkpoint."""

    model: str = Field(
        "teacher",
        description="'teacher' = the recipe's teacher as trained so far; else a model name (needs checkpoint)",
    )
    weight: float = Field(1.0, gt=0, le=1e6, description="relative weight; weights are normalized to sum to 1")

    @field_validator("model")
    @classmethod
    def _known(cls, v: str) -> str:
        return v if v == "teacher" else check_model_name(v)

    @model_validator(mode="after")
    def _weights_needed(self) -> TeacherRef:
        if self.model != "teacher" and self.checkpoint is None and self.weights is None and not self.pretrained:
            raise ValueError(
                f"teacher {self.model!r} needs weights (checkpoint:, or weights:/pretrained: for torchvision:/timm: "
                "models): a randomly initialized teacher teaches nothing"
            )
        given = self.checkpoint is not None or self.kwargs or self.head or self.weights or self.pretrained
        if self.model == "teacher" and given:
            raise ValueError(
                "model 'teacher' is the recipe's teacher; set its checkpoint/weights/kwargs/head under teacher:"
            )
        return self


class KD(BaseModel):
    """Knowledge distillation: weighted loss terms against one or several teachers.

    ``loss: NAME`` with ``temperature:``/``alpha:`` is a shorthand for one logit loss; it is spelled
    out into ``losses:`` before validation (``loss: hinton, temperature: 2`` becomes
    ``losses: [{name: hinton, temperature: 2}]``; a loss without built-in CE gets ``{name: ce}``
    beside it), so the resolved recipe shows one spelling. ``kd: true`` is ``kd: {}``: Hinton KD
    with its defaults."""

    model_config = ConfigDict(extra="forbid")

    losses: list[LossUnion] = Field(
        default_factory=lambda: [LOSSES.get("hinton")()],
        min_length=1,
        description="weighted loss terms, summed; default Hinton KD (shorthand: loss/temperature/alpha)",
    )
    teachers: list[TeacherRef] = Field(
        default_factory=list, description="several teachers with weights; default: the recipe's teacher alone"
    )
    combine: Literal["average", "per_teacher"] = Field(
        "average", description="average: one soft target = weighted mean of the teachers'; per_teacher: one loss each"
    )
    teacher_precision: Literal["same", "fp32", "bf16", "fp16"] = Field(
        "same", description="autocast for the teachers' forward; same = the stage's precision"
    )
    cache_teacher: bool = Field(
        False,
        description="compute each teacher logit once and reuse it; needs un-augmented data or augment_views",
    )
    augment_views: int | None = Field(
        None, ge=1, le=1000, description="replay K fixed augmentations per image (epoch e shows view e mod K)"
    )

    _extra_teachers: dict[int, nn.Module] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _spell_out(cls, data: Any) -> Any:
        """``true`` -> ``{}``; the loss/temperature/alpha shorthand -> ``losses: [...]``."""
        if data is True:
            return {}
        if not isinstance(data, dict) or not any(k in data for k in SHORTHAND):
            return data
        given = {k: data[k] for k in SHORTHAND if k in data}
        if "losses" in data:
            raise ValueError(f"give losses: or the shorthand {'/'.join(given)}, not both")
        name = given.pop("loss", "hinton")
        if not isinstance(name, str) or name not in LOSSES:
            raise ValueError(LOSSES.unknown_message(str(name)))
        term_cls = LOSSES.get(name)
        if not term_cls.logits_only:
            raise ValueError(f"{name!r} names layers: write it under losses: [{{name: {name}, pairs: [...]}}]")
        unused = [k for k in given if k not in term_cls.model_fields]
        if unused:
            raise ValueError(f"{'/'.join(unused)} has no effect with loss {name!r}")
        term = {"name": name, **given}
        rest = {k: v for k, v in data.items() if k not in SHORTHAND}
        return rest | {"losses": [term] if term_cls.includes_ce else [{"name": "ce"}, term]}

    @model_validator(mode="after")
    def _consistent(self) -> KD:
        if self.cache_teacher:
            needs_features = [t.name for t in self.losses if not t.logits_only]
            if needs_features:
                raise ValueError(
                    f"cache_teacher: caches teacher logits only, but {', '.join(needs_features)} needs teacher "
                    "features at every step; turn cache_teacher off"
                )
        return self

    def loss_terms(self) -> list[LossTerm]:
        return list(self.losses)

    def requirements(self) -> frozenset[str]:
        uses_recipe_teacher = not self.teachers or any(t.model == "teacher" for t in self.teachers)
        return frozenset({"teacher"}) if uses_recipe_teacher else frozenset()

    def label(self) -> str:
        names = "+".join(t.name for t in self.loss_terms() if t.name != "ce" or len(self.loss_terms()) == 1)
        extra = f", {len(self.teachers)} teachers ({self.combine})" if len(self.teachers) > 1 else ""
        return f"{names}{extra}{', cached teacher' if self.cache_teacher else ''}"

    # ------------------------------------------------------------------ preflight: before anything is written
    def preflight(self, models: dict[str, nn.Module], data: ImageData, field: str) -> None:
        """Build extra teachers (their checkpoints must fit), check every layer name and output rank
        with one dry forward, and check that caching teacher logits is correct for this data."""
        self._extra_teachers = {
            i: build_from_spec(ref, data, f"{field}.teachers.{i}", "teacher")
            for i, ref in enumerate(self.teachers)
            if ref.model != "teacher"
        }
        teachers = self.teacher_list(models.get("teacher"))
        for i, term in enumerate(self.losses):
            for j, pair in enumerate(term.layer_pairs()):
                where = f"{field}.losses.{i}.pairs.{j}"
                try:
                    find_module(models["student"], pair.student, "student")
                except ValueError as exc:
                    raise CompressError(f"{where}.student: {exc}") from None
                for k, (teacher, _) in enumerate(teachers):
                    try:
                        find_module(teacher, pair.teacher, f"teacher {k}" if len(teachers) > 1 else "teacher")
                    except ValueError as exc:
                        raise CompressError(f"{where}.teacher: {exc}") from None
        mixing = [f"data.{k}" for k in ("mixup", "cutmix") if getattr(data, k, 0.0) > 0] if mixes(data) else []
        if self.cache_teacher and mixing:
            raise CompressError(
                f"{field}.cache_teacher: {' and '.join(mixing)} blend every training image with another one anew "
                "at each step, so cached teacher logits would belong to other images; turn cache_teacher off "
                f"or set {' and '.join(f'{m}: 0' for m in mixing)}"
            )
        if self.cache_teacher and data.augment and self.augment_views is None:
            raise CompressError(
                f"{field}.cache_teacher: the training images are randomly augmented anew every epoch, so cached "
                "teacher logits would belong to other images; set augment_views: K (replay K fixed "
                "augmentations per image) or data.augment: false, or turn cache_teacher off"
            )
        if self.cache_teacher:
            views = self.augment_views if data.augment else 1
            need = TeacherCache.nbytes(views or 1, len(self.teachers) or 1, data.train_size, data.num_classes)
            have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            if need > have // 4:
                raise CompressError(
                    f"{field}.cache_teacher: the logit cache would need {need / 2**30:.1f} GiB (views × teachers × "
                    f"images × classes × 4 B), over a quarter of this machine's {have / 2**30:.0f} GiB; lower "
                    "augment_views or turn cache_teacher off"
                )
        objective = self.objective(models["student"], models.get("teacher"), data.example_input(2), field, "fp32", 0.0)
        if mixing:  # every term must take the soft labels of mixed images (DKD needs one true class)
            failed = objective.soft_label_failure(models["student"], data.example_input(2), data.num_classes)
            if failed is not None:
                i, reason = failed
                raise CompressError(
                    f"{field}.losses.{i}: {self.losses[i].name} cannot learn from the soft labels of mixed images "
                    f"({' and '.join(mixing)} are on: {reason}); use ce/hinton terms or turn the mixing off"
                )

    def teacher_list(self, recipe_teacher: nn.Module | None) -> list[tuple[nn.Module, float]]:
        if not self.teachers:
            assert recipe_teacher is not None
            return [(recipe_teacher, 1.0)]
        out = []
        for i, ref in enumerate(self.teachers):
            model = recipe_teacher if ref.model == "teacher" else self._extra_teachers[i]
            assert model is not None
            out.append((model, ref.weight))
        return out

    def objective(
        self,
        student: nn.Module,
        recipe_teacher: nn.Module | None,
        example: torch.Tensor,
        field: str,
        precision: str,
        label_smoothing: float,
        cache: TeacherCache | None = None,
    ) -> DistillObjective:
        device = example.device
        teacher_precision = precision if self.teacher_precision == "same" else self.teacher_precision
        try:
            return DistillObjective(
                student,
                self.teacher_list(recipe_teacher),
                self.loss_terms(),
                example=example,
                combine=self.combine,
                label_smoothing=label_smoothing,
                teacher_dtype=autocast_dtype(teacher_precision, device),
                cache=cache,
            )
        except ValueError as exc:
            raise CompressError(f"{field}.losses: {exc}") from None

    def fit(
        self,
        ctx: Context,
        student: nn.Module,
        epochs: int,
        cfg: OptimConfig,
        field: str,
        what: str = "distill",
        after_step: Callable[[float], None] | None = None,
    ) -> dict[str, Any]:
        """Fit ``student`` against the teachers with this config's loss terms; hooks removed after."""
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        teachers = [t for t, _ in self.teacher_list(ctx.teacher)]
        for t in teachers:
            t.to(device=ctx.device, memory_format=fmt)
        student.to(ctx.device)
        cache = None
        if self.cache_teacher:
            views = (self.augment_views or 1) if ctx.data.augment else 1
            cache = TeacherCache(views, len(teachers), ctx.data.train_size, ctx.data.num_classes, ctx.device)
        objective = self.objective(
            student, ctx.teacher, ctx.example_input(2), field, cfg.precision, cfg.label_smoothing, cache
        )
        try:
            with objective:
                label = f"{what} ({self.label()})"
                metrics = fit(
                    ctx, student, objective, epochs, cfg, label, after_step, aux=objective.aux, views=self.augment_views
                )
        finally:
            for t in teachers:
                t.to(memory_format=torch.contiguous_format)
        metrics["loss_terms"] = [t.model_dump() for t in self.loss_terms()]
        if len(teachers) > 1:
            metrics["teacher_weights"] = objective.weights
        if cache is not None:
            metrics["teacher_cache"] = {"hits": cache.hits, "misses": cache.misses}
        return metrics


#: an optional ``kd:`` block: ``false`` (or absent) = none, ``true`` = :class:`KD`'s defaults
OptionalKD = Annotated[KD | None, BeforeValidator(lambda v: None if v is False else v)]


class FineTuneOptim(OptimConfig):
    """``optim:`` of a fine-tune: a pruned or sparsified student starts near its optimum."""

    lr: float = Field(0.01, gt=0, le=10)


class FineTune(BaseModel):
    """Fine-tuning after a structural change, on labels or (with ``kd:``) from the teacher(s)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(ge=1, le=10_000, description="fine-tuning epochs (after each step when a stage has steps)")
    optim: FineTuneOptim = Field(default_factory=FineTuneOptim)
    kd: OptionalKD = Field(None, description="distill from the teacher(s) while fine-tuning; kd: true = defaults")

    def requirements(self) -> frozenset[str]:
        return self.kd.requirements() if self.kd is not None else frozenset()

    def preflight(self, models: dict[str, nn.Module], data: ImageData, field: str) -> None:
        if self.kd is not None:
            self.kd.preflight(models, data, f"{field}.kd")

    def run(
        self, ctx: Context, model: nn.Module, label: str, field: str, after_step: Callable[[float], None] | None = None
    ) -> dict[str, Any]:
        return tune(ctx, model, self.epochs, self.optim, self.kd, label, field, after_step)


def tune(
    ctx: Context,
    model: nn.Module,
    epochs: int,
    optim: OptimConfig,
    kd: KD | None,
    label: str,
    field: str,
    after_step: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` for ``epochs``: with ``kd``'s losses against the teacher(s), else on labels."""
    if kd is not None:
        return kd.fit(ctx, model, epochs, optim, f"{field}.kd", f"{label} + KD", after_step)
    return fit(ctx, model, cross_entropy(optim.label_smoothing), epochs, optim, label, after_step)


#: where a fine-tuning stage's old flat fields went (``finetune_epochs: 3, lr: 0.01``)
FINETUNE_MOVES = (
    moved("finetune.optim", FineTuneOptim)
    | moved("finetune.kd", KD, extra=SHORTHAND)
    | {
        "finetune_epochs": "moved to finetune.epochs",
        "distill": "replaced by finetune.kd (kd: true = KD with defaults)",
    }
)
