"""The ``model`` engine: FUSAR-GPT on Dask workers with the ``GPU`` resource (DESIGN 3.5).

A thin adapter from :class:`fusarbatch.engines.Engine` to :mod:`fusarbatch.inference.workers`:
:func:`~fusarbatch.inference.workers.prepare_tiles` (read + render, CPU) and
:func:`~fusarbatch.inference.workers.infer_prepared` (the model, ``GPU=1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from fusarbatch.inference.workers import (
    GPU_RESOURCE,
    BatchResult,
    ModelSpec,
    TaskSpec,
    infer_prepared,
    prepare_tiles,
    resolve_device,
    warm_model,
)
from fusarbatch.outputs.ledger import model_hash

if TYPE_CHECKING:
    from fusarbatch.config import RunConfig


@dataclass(frozen=True)
class ModelEngine:
    """FUSAR-GPT: one detection prompt per label and, with classes, one tile classification prompt."""

    spec: ModelSpec
    task: TaskSpec
    model_id: str
    fingerprint: str
    grid: int
    resources: dict[str, int] | None
    scheduler: str | None = None
    require_gpu: bool = False

    @classmethod
    def open(cls, cfg: RunConfig) -> ModelEngine:
        """Resolve and check the model directories (headers, JSON) and fingerprint them; nothing is loaded.

        :raises ModelError: an unusable model directory. :raises UsageError: a checkpoint without base.
        """
        from fusarbatch.model.demo import demo_model_dir
        from fusarbatch.model.fusar_gpt import model_image_size, resolve_model_dirs

        model_dir, adapter_dir = resolve_model_dirs(cfg.model or demo_model_dir(), cfg.base_model)
        return cls(
            spec=ModelSpec(
                str(model_dir),
                adapter_dir=None if adapter_dir is None else str(adapter_dir),
                device=cfg.device,
                max_new_tokens=cfg.max_new_tokens,
                batch_size=cfg.batch_size,
            ),
            task=TaskSpec(labels=cfg.labels, classes=cfg.classes or (*cfg.labels, "background")),
            model_id=(adapter_dir or model_dir).resolve().name,
            fingerprint=model_hash(*(d for d in (model_dir, adapter_dir) if d is not None)),
            grid=model_image_size(model_dir, adapter_dir),  # the model's own grid (tlm_config.json)
            resources=dict(GPU_RESOURCE),
            scheduler=cfg.scheduler,
            require_gpu=cfg.require_gpu,
        )

    def start(self) -> ModelEngine:
        """The device: CUDA when asked for (or by default) and present, else the CPU; on a remote
        scheduler, what ``--device`` says (the workers decide). :raises UsageError: ``--require-gpu``
        and no CUDA device visible."""
        if self.scheduler:
            return self
        device = resolve_device(self.spec.device, require_gpu=self.require_gpu)
        return replace(self, spec=replace(self.spec, device=device))

    def warm(self) -> str:
        return warm_model(self.spec)

    def prepare(self, store: str, group: str, tile_ids: Sequence[int], after: Any = None) -> Any:
        return prepare_tiles(store, group, tile_ids, self.task.render_mode, after, size=self.grid)

    def answer(self, prepared: Any) -> BatchResult:
        return infer_prepared(self.spec, self.task, prepared)
