"""The ``cfar`` engine of ``fusarbatch run``: the CA-CFAR detector (:mod:`fusarbatch.engines.cfar`) on the
tiles of the tile store. No model and no GPU: both tasks of a batch run on any worker thread.

Per tile:

- **Band**: the first co-polarisation (VV or HH) of the tile, else its first band -- the band the model
  is shown in ``grey`` rendering (:func:`fusarbatch.render.render`).
- **Intensity**: ``units = "dB"`` tiles (calibrated backscatter) -> linear intensity
  (:func:`~fusarbatch.engines.cfar.db_to_linear`); ``units = "dn"`` tiles (uncalibrated 8-bit values)
  -> :func:`~fusarbatch.engines.cfar.image_to_linear`, as for image chips. NaN (nodata, padding past the
  scene edge) is never detected and never part of a background.
- **Windows**: ``cfar_guard_m`` and ``cfar_background_m`` are metres on the ground, converted with the
  tile's pixel size (:func:`fusarbatch.inference.geo.pixel_size_m` at the tile centre; the geometric mean
  of its two sides) to odd pixel counts (:func:`~fusarbatch.engines.cfar.metres_to_window`); the
  minimum area ``cfar_min_area_m2`` likewise (at least 1 pixel). A background window larger than the
  tile is shrunk, with the guard window in proportion, to the largest odd size inside the tile (a
  warning says so). Pre-filter, opening and closing keep the chip sizes of
  :data:`~fusarbatch.engines.cfar.CHIP_PARAMS` (pixels).
- **Answer**: one box per component, labelled with the run's label, scored per box
  (:func:`~fusarbatch.engines.cfar.score_of`), on the tile's own pixels (``grid`` = tile size). The tile
  class is not answered (``scene_class`` stays null): CFAR detects and counts, it does not classify.

The defaults in metres were not tuned on labelled scenes (none are at hand): they keep the guard window
about twice the length of a large ship (400 m) and the background ring as wide again, and at Sentinel-1
IW GRD's 10 m pixels they give 81 / 161 px windows and a 20 px minimum area, the sizes chosen on SSDD
chips (benchmarks/RESULTS.md, "CFAR on SSDD").
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fusarbatch.engines.cfar import (
    CHIP_PARAMS,
    CfarParams,
    db_to_linear,
    detect,
    image_to_linear,
    metres_to_window,
)
from fusarbatch.inference.workers import BatchResult, TileAnswer

if TYPE_CHECKING:
    from fusarbatch.config import RunConfig

log = logging.getLogger(__name__)

#: Bumped when a change of the detector changes its boxes for the same inputs (part of the ledger's
#: model hash, so that reruns redo scenes made by an older detector).
CFAR_VERSION = 1

DEFAULT_GUARD_M = 800.0
DEFAULT_BACKGROUND_M = 1600.0
DEFAULT_MIN_AREA_M2 = 2000.0


@dataclass(frozen=True)
class CfarTiles:
    """One batch read by :meth:`CfarEngine.prepare`: the detection band of each tile, ``(n, y, x)``
    float32 in the store's units, with each tile's affine (scene CRS) and the scene CRS."""

    group: str
    tile_ids: list[int]
    values: np.ndarray
    units: str
    transforms: np.ndarray
    crs: str


@dataclass(frozen=True)
class CfarEngine:
    """Two-parameter CA-CFAR on the CPU (module docstring)."""

    label: str
    guard_m: float = DEFAULT_GUARD_M
    background_m: float = DEFAULT_BACKGROUND_M
    k: float = CHIP_PARAMS.k
    min_area_m2: float = DEFAULT_MIN_AREA_M2
    grid: int = 504
    """Tile size: boxes are answered on the tile's own pixels."""
    model_id: str = "cfar"
    fingerprint: str = f"cfar-v{CFAR_VERSION}"
    resources: dict[str, int] | None = None

    @classmethod
    def open(cls, cfg: RunConfig) -> CfarEngine:
        """The engine of a run (the config has checked that it has one label)."""
        return cls(
            label=cfg.labels[0],
            guard_m=cfg.cfar_guard_m,
            background_m=cfg.cfar_background_m,
            k=cfg.cfar_k,
            min_area_m2=cfg.cfar_min_area_m2,
            grid=cfg.tile_size,
        )

    def start(self) -> CfarEngine:
        return self

    def warm(self) -> None:
        return None

    def params_for(self, pixel_m: tuple[float, float], tile: tuple[int, int]) -> CfarParams:
        """Pixel parameters for a tile of ``tile`` = (height, width) pixels of ``pixel_m`` = (along
        columns, along rows) metres."""
        size = math.sqrt(pixel_m[0] * pixel_m[1])
        guard = metres_to_window(self.guard_m, size)
        background = metres_to_window(self.background_m, size, minimum=guard + 2)
        fit = min(tile) - 1 + min(tile) % 2  # largest odd size inside the tile
        if background > fit:
            shrunk_guard = max(1, round(guard * fit / background))
            shrunk_guard = min(shrunk_guard - 1 + shrunk_guard % 2, fit - 2)
            log.warning(
                "--engine cfar: background window %.0f m is %d px at %.2f m pixels, larger than the "
                "%d x %d px tile: windows shrunk to %d / %d px (guard / background)",
                self.background_m,
                background,
                size,
                tile[1],
                tile[0],
                shrunk_guard,
                fit,
            )
            guard, background = shrunk_guard, fit
        min_area = max(1, math.ceil(self.min_area_m2 / (pixel_m[0] * pixel_m[1])))
        return replace(CHIP_PARAMS, guard=guard, background=background, k=self.k, min_area=min_area)

    def prepare(self, store: str, group: str, tile_ids: Sequence[int], after: Any = None) -> CfarTiles:
        """Read the detection band of the tiles (module docstring) from ``<store>/<group>``."""
        import zarr

        g = zarr.open_group(str(Path(store) / group), mode="r", zarr_format=3)
        ids = np.asarray(tile_ids, dtype=np.int64)
        pols = [str(p).upper() for p in g.attrs["pols"]]
        band = next((i for i, p in enumerate(pols) if p in ("VV", "HH")), 0)
        values = g["backscatter"].get_orthogonal_selection((ids, band, slice(None), slice(None)))
        return CfarTiles(
            group=group,
            tile_ids=[int(t) for t in tile_ids],
            values=np.asarray(values, dtype=np.float32),
            units=str(g.attrs.get("units", "dB")),
            transforms=np.asarray(g["transform"].get_orthogonal_selection((ids, slice(None)))),
            crs=str(g.attrs["crs"]),
        )

    def answer(self, prepared: CfarTiles) -> BatchResult:
        """CFAR on every tile of the batch; boxes on the tile's pixels (``grid`` = tile size)."""
        from affine import Affine

        from fusarbatch.inference.geo import MapProjector, pixel_size_m
        from fusarbatch.model.prompts import Box

        t0 = time.perf_counter()
        project = MapProjector(prepared.crs)
        answers = []
        for i, tile_id in enumerate(prepared.tile_ids):
            values = prepared.values[i]
            height, width = values.shape
            pixel_m = pixel_size_m(Affine(*prepared.transforms[i][:6]), project, width / 2, height / 2)
            params = self.params_for(pixel_m, (height, width))
            intensity = db_to_linear(values) if prepared.units == "dB" else image_to_linear(values)
            sx, sy = self.grid / width, self.grid / height
            found = detect(intensity, params)
            answers.append(
                TileAnswer(
                    tile_id=tile_id,
                    grid=self.grid,
                    boxes=[Box(self.label, b.x1 * sx, b.y1 * sy, b.x2 * sx, b.y2 * sy) for b in found],
                    scores=[b.score for b in found],
                    answer_scores=[None] * len(found),  # no generated answer
                    model_labels=[None] * len(found),
                )
            )
        return BatchResult(answers, time.perf_counter() - t0, 0)
