"""Detection engines behind ``fusarbatch run --engine NAME`` (issue 9).

An engine answers batches of tiles of the tile store for :mod:`fusarbatch.pipeline`, which does
everything else the same way for all of them: tiling, anchors, geo (pixel box -> tile -> scene CRS ->
EPSG:4326), cross-tile NMS, GeoParquet, ledger. Registered engines (:data:`ENGINES`):

- ``model`` (default): FUSAR-GPT on GPU workers (:mod:`fusarbatch.engines.model`): detection, counting and
  tile classes.
- ``cfar``: a two-parameter CA-CFAR ship detector on the CPU (:mod:`fusarbatch.engines.cfar_run`, the
  detector itself in :mod:`fusarbatch.engines.cfar`): detection and counting only; no model, no GPU.

Adding one (say ``vllm``): a class with the :class:`Engine` interface and a ``open(cfg)`` classmethod,
and one line in :data:`ENGINES`. This module stays light (no torch, no scipy): the config imports it.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from fusarbatch.config import RunConfig
    from fusarbatch.inference.workers import BatchResult

#: Engine name -> ``module:class`` (imported when the engine is opened).
ENGINES: dict[str, str] = {
    "model": "fusarbatch.engines.model:ModelEngine",
    "cfar": "fusarbatch.engines.cfar_run:CfarEngine",
}
DEFAULT_ENGINE = "model"


class Engine(Protocol):
    """What :mod:`fusarbatch.pipeline` needs from an engine. Instances travel to Dask workers inside
    task arguments, so they are small, immutable and picklable (frozen dataclasses)."""

    model_id: str
    """Written in the ``model_id`` column of every table and in the run summary."""
    fingerprint: str
    """The ledger's model hash: a done scene is redone when it changes."""
    grid: int
    """The boxes of :attr:`TileAnswer.boxes` are on a ``grid`` x ``grid`` frame of the tile."""
    resources: dict[str, int] | None
    """Dask resources of the :meth:`answer` tasks (``{"GPU": 1}`` for the model; None: any thread)."""

    def start(self) -> Engine:
        """Checks that belong to the run, not to opening (e.g. the device); returns the engine whose
        methods the tasks call. :raises FusarbatchError: with one line for the user."""
        ...

    def warm(self) -> Any:
        """Load what the :meth:`answer` tasks need, once per worker with :attr:`resources` (called only
        when :attr:`resources` is set)."""
        ...

    def prepare(self, store: str, group: str, tile_ids: Sequence[int], after: Any = None) -> Any:
        """CPU task without resources: read (and render) tiles of ``<store>/<group>``. ``after`` only
        orders the task behind an earlier batch (memory stays flat)."""
        ...

    def answer(self, prepared: Any) -> BatchResult:
        """Answer one prepared batch; never raises on content (parse failures go to ``errors``)."""
        ...


def open_engine(cfg: RunConfig) -> Engine:
    """The engine ``cfg.engine`` for a run, with its files checked (no model is loaded here).

    :raises UsageError: an unknown engine name.
    :raises FusarbatchError: what the engine's ``open`` raises (e.g. an unusable model directory).
    """
    from fusarbatch.errors import UsageError

    if cfg.engine not in ENGINES:
        raise UsageError(f"--engine {cfg.engine!r}: unknown; choose one of {', '.join(ENGINES)}")
    module, _, name = ENGINES[cfg.engine].partition(":")
    return getattr(importlib.import_module(module), name).open(cfg)


def engine_names() -> Sequence[str]:
    """The registered engine names, default first."""
    return (DEFAULT_ENGINE, *(n for n in ENGINES if n != DEFAULT_ENGINE))
