"""``run --prescreen cfar`` (issue 11): a tile goes to the model only if CA-CFAR finds at least one candidate
in it at a permissive threshold; the others are recorded ``skipped`` with the reason.

The pre-screen is the ``cfar`` engine (:class:`~fusarbatch.engines.cfar_run.CfarEngine`: the co-pol band,
linear intensity, ``cfar_guard_m`` / ``cfar_background_m`` / ``cfar_min_area_m2`` windows from metres) at
the threshold ``prescreen_k`` (default :data:`PRESCREEN_K`), run as CPU tasks on the cluster before the
model tasks of a scene are submitted.

:data:`PRESCREEN_K` was chosen by measurement (benchmarks/prescreen.py, benchmarks/RESULTS.md "CFAR
pre-screen threshold (issue 11)"): at k = 2.5, 100% of the 222 SSDD test chips (each holds a ship) have a
candidate and 100% of 100 GENERATED empty-sea tiles (4.4-look speckle, 10 m, no target) have none
(targets: >= 98% and >= 80%); k = 2 skipped 97% of empty sea, k = 3 passed 99.1% of SSDD.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from fusarbatch.engines.cfar_run import CfarEngine

#: Default pre-screen threshold on the CFAR statistic (module docstring).
PRESCREEN_K = 2.5
#: Tiles per pre-screen task.
PRESCREEN_BATCH = 16


def no_candidates(engine: CfarEngine, store: str, group: str, tile_ids: Sequence[int]) -> list[int]:
    """The tiles of ``tile_ids`` (store ids) in which ``engine`` finds no candidate (a Dask task, CPU)."""
    result = engine.answer(engine.prepare(store, group, tile_ids))
    return [a.tile_id for a in result.answers if not a.boxes]


def prescreen_skips(
    client: Any, cfg: Any, store: str, group: str, candidates: Sequence[int]
) -> dict[int, str]:
    """``{tile id: reason}`` for the ``candidates`` without a CFAR candidate at ``cfg.prescreen_k``
    (``{}`` unless ``cfg.prescreen == "cfar"``); the batches run on ``client``'s workers."""
    if cfg.prescreen != "cfar" or not len(candidates):
        return {}
    engine = replace(CfarEngine.open(cfg), k=cfg.prescreen_k)  # the run's CFAR, at the permissive threshold
    ids = [int(i) for i in candidates]
    futures = [
        client.submit(no_candidates, engine, store, group, ids[s : s + PRESCREEN_BATCH], pure=False)
        for s in range(0, len(ids), PRESCREEN_BATCH)
    ]
    reason = f"no CFAR candidate at k = {cfg.prescreen_k:g} (--prescreen cfar)"
    return {int(t): reason for batch in client.gather(futures) for t in batch}
