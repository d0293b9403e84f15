"""The Context a stage works on: models by role, data, device, run dir, artifacts, logging."""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from compress.checkpoint import save_model
from compress.data import ImageData
from compress.errors import StageFailed
from compress.structure import describe, rebuild_problem

if TYPE_CHECKING:
    from compress.config import RecipeBase
    from compress.models import ModelSpec


@dataclass
class Artifact:
    """One model the report measures: a torch snapshot or an ONNX file."""

    name: str
    role: str  # "teacher" | "student"
    format: str  # "torch" | "onnx"
    precision: str  # "fp32" | "int8"
    path: Path
    stage: str  # which stage produced it ("input" for a loaded checkpoint)
    model: nn.Module | None = field(default=None, repr=False)  # torch artifacts only
    source: str | None = None  # for ONNX: the torch artifact it was exported from
    factory: str | None = None  # torch: the model factory to rebuild it with (the recipe's, never a file's)


@dataclass
class Context:
    recipe: RecipeBase
    device: torch.device
    run_dir: Path
    data: ImageData
    models: dict[str, nn.Module]
    specs: dict[str, ModelSpec]
    artifacts: list[Artifact] = field(default_factory=list)
    quiet: bool = False
    console: Console = field(default_factory=lambda: Console(stderr=True))
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("compress"))
    stage_index: int = 0
    stage_label: str = ""
    fit_calls: int = 0  # training loops started in the current stage (names their resume files)
    world: int = 1  # processes training together under torchrun (DDP); rank 0 writes everything
    rank: int = 0
    #: each role's model as its factory builds it (on the meta device): what a checkpoint is rebuilt from
    _references: dict[str, nn.Module] = field(default_factory=dict, repr=False, init=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def student(self) -> nn.Module:
        return self.models["student"]

    @property
    def teacher(self) -> nn.Module | None:
        return self.models.get("teacher")

    def example_input(self, batch_size: int = 2) -> torch.Tensor:
        return self.data.example_input(batch_size).to(self.device)

    # ------------------------------------------------------------------ artifacts
    def latest(self, role: str, fmt: str, precision: str = "fp32") -> Artifact | None:
        for art in reversed(self.artifacts):
            if art.role == role and art.format == fmt and art.precision == precision:
                return art
        return None

    def add_artifact(self, art: Artifact) -> Artifact:
        self.artifacts = [a for a in self.artifacts if a.name != art.name] + [art]
        return art

    def snapshot(self, role: str, label: str) -> Artifact:
        """Checkpoint ``role``'s current model and record a frozen copy for the report.

        The weights are written twice, ``ROLE.pt`` (the artifact the report and --resume use) and
        ``ROLE.safetensors`` beside it (the same record, for tools that read only safetensors; it
        doubles the checkpoints' disk use, not the report's sizes, which measure the .pt).

        The checkpoint records the model's structure as it is now (see compress.checkpoint), so a
        stage that changed it needs to declare nothing; one that left a module no checkpoint can
        rebuild fails here, naming the module, instead of at a later --resume or bench.
        """
        model = self.models[role]
        spec = self.specs[role]
        path = self.run_dir / "checkpoints" / f"{self.stage_index:02d}-{label}" / f"{role}.pt"
        structure = describe(model)
        problem = rebuild_problem(structure, self.reference(role))
        if problem is not None:
            raise StageFailed(f"stage {self.stage_index} ({label}) left a {role} no checkpoint can rebuild: {problem}")
        for file in (path, path.with_suffix(".safetensors")):  # the same record; safetensors for other tools
            save_model(
                model,
                file,
                name=spec.model,
                kwargs=spec.kwargs,
                num_classes=self.data.num_classes,
                in_channels=self.data.channels,
                structure=structure,
            )
        frozen = copy.deepcopy(model).eval()
        return self.add_artifact(
            Artifact(
                name=f"{role}@{label}",
                role=role,
                format="torch",
                precision="fp32",
                path=path,
                stage=label,
                model=frozen,
                factory=spec.model,
            )
        )

    def reference(self, role: str) -> nn.Module:
        """``role``'s model as its factory builds it, without weights (meta device; built once)."""
        if role not in self._references:
            from compress.models import build_model

            spec = self.specs[role]
            args = (spec.model, self.data.num_classes, self.data.channels)
            try:
                with torch.device("meta"):
                    self._references[role] = build_model(*args, **spec.kwargs)
            except Exception:  # noqa: BLE001 - a factory that needs real tensors: build it for real
                self._references[role] = build_model(*args, **spec.kwargs)
        return self._references[role]

    def next_resume_file(self) -> Path:
        """Where the current stage's next training loop keeps its per-epoch state."""
        self.fit_calls += 1
        return self.run_dir / "resume" / f"{self.stage_index:02d}-{self.fit_calls}.pt"

    # ------------------------------------------------------------------ progress
    @contextmanager
    def progress(self) -> Any:
        """A rich progress bar (epoch, loss, accuracy, ETA); a no-op bar when quiet or not on a terminal."""
        prog = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=self.quiet or not self.console.is_terminal,  # no terminal: plain per-epoch lines instead
            transient=False,
        )
        with prog:
            yield prog
