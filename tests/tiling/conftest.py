"""Fixtures for the tiling tests: the demo scenes, generated GeoTIFFs, and a geo-accuracy checker.

Fixtures whose data is synthetic say "generated" in their names.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import pytest
import rasterio
import shapely
import zarr
from affine import Affine
from pyproj import CRS as ProjCRS

from fusarbatch.catalog.scene import BandRef, Scene, scenes_from_items
from fusarbatch.catalog.spec import resolve_catalog


@pytest.fixture(scope="session")
def demo_scenes() -> dict[str, Scene]:
    """The three demo scenes keyed by a short name: camargue, sen12ms, quicklook."""
    spec = resolve_catalog("demo")
    catalog = pystac.Catalog.from_file(spec.href)
    items = []
    for item in catalog.get_items(recursive=True):
        item.make_asset_hrefs_absolute()
        items.append(item.to_dict())
    scenes = scenes_from_items(items, spec)
    by_name = {}
    for scene in scenes:
        key = (
            "camargue"
            if "camargue" in scene.item_id
            else "sen12ms"
            if "SEN12MS" in scene.item_id
            else "quicklook"
        )
        by_name[key] = scene
    assert set(by_name) == {"camargue", "sen12ms", "quicklook"}
    return by_name


@pytest.fixture
def write_generated_tif(tmp_path: Path) -> Callable[..., Path]:
    """Write a generated GeoTIFF: ``write_generated_tif(name, data (bands, H, W), **profile)``."""

    def write(name: str, data: np.ndarray, **profile: Any) -> Path:
        path = tmp_path / name
        data = np.asarray(data)
        if data.ndim == 2:
            data = data[None]
        base = {
            "driver": "GTiff",
            "height": data.shape[1],
            "width": data.shape[2],
            "count": data.shape[0],
            "dtype": data.dtype.name,
            "crs": "EPSG:32633",
            "transform": Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 5_100_000.0),
        }
        base.update(profile)
        with rasterio.open(path, "w", **base) as dst:
            dst.write(data)
        return path

    return write


@pytest.fixture
def make_scene() -> Callable[..., Scene]:
    """``make_scene(item_id, {pol: BandRef | path}, scale=..., when=...)`` -> a Scene for generated data."""

    def make(
        item_id: str,
        bands: dict[str, BandRef | Path | str],
        *,
        scale: str = "db",
        quantity: str = "sigma0",
        when: dt.datetime | None = None,
        crs: str | None = None,
    ) -> Scene:
        refs = {pol: ref if isinstance(ref, BandRef) else BandRef(str(ref), 1) for pol, ref in bands.items()}
        return Scene(
            item_id=item_id,
            datetime=when or dt.datetime(2024, 1, 15, 10, 30, tzinfo=dt.UTC),
            footprint=shapely.box(14.0, 45.0, 14.1, 45.1),
            bands=refs,
            quantity=quantity,
            scale=scale,
            crs=crs,
        )

    return make


def db_reference(values: np.ndarray, scale: str) -> np.ndarray:
    """Hand-written reference of the dB conversion (float32, same formulas as the docs)."""
    x = np.asarray(values, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        if scale == "power":
            out = np.float32(10.0) * np.log10(x)
        elif scale == "amplitude":
            out = np.float32(20.0) * np.log10(x)
        else:
            out = x.copy()
    if scale in ("power", "amplitude"):
        out[~(x > 0)] = np.nan
    out[~np.isfinite(out)] = np.nan
    return out.astype(np.float32)


def read_reference(
    path: Path | str, bands: list[int], nodata: list[float | None] | None = None
) -> np.ndarray:
    """Read bands of a georeferenced raster with plain rasterio, nodata (raster's and given) -> NaN."""
    with rasterio.open(path) as src:
        raw = src.read(bands)
        out = raw.astype(np.float32)
        for i, band in enumerate(bands):
            for value in (src.nodatavals[band - 1], (nodata or [None] * len(bands))[i]):
                if value is not None:
                    out[i][raw[i] == np.asarray(value).astype(raw.dtype)] = np.nan
    return out


def check_geo_accuracy(
    store: Path,
    group: str,
    reference: np.ndarray,
    ref_transform: Affine,
    ref_crs: Any,
    *,
    seed: int = 0,
    samples: int = 64,
) -> int:
    """Check every tile of ``group`` against a reference raster on the source grid.

    - geometry: for ``samples`` random pixels of each tile, the map point of the pixel centre from the
      stored tile affine, mapped back through the reference raster's own affine, lands on the same pixel
      of the scene (within 1e-6 pixel) and the tile value equals the reference value there;
    - values: the whole tile equals the reference window (exact, NaN where nodata), NaN past the edge.

    :returns: the number of tiles checked.
    """
    g = zarr.open_group(str(store), path=group, mode="r")
    assert g.attrs["complete"] is True
    assert ProjCRS.from_wkt(g.attrs["crs"]) == ProjCRS.from_user_input(ref_crs)
    tiles = g["backscatter"][:]
    transforms = g["transform"][:]
    row_off = g["row_off"][:]
    col_off = g["col_off"][:]
    n, npol, size, _ = tiles.shape
    assert npol == reference.shape[0]
    height, width = reference.shape[1:]
    assert g.attrs["scene_shape"] == [height, width]
    assert np.allclose(g.attrs["scene_transform"], tuple(ref_transform)[:6], rtol=0, atol=1e-9)
    inverse = ~ref_transform
    rng = np.random.default_rng(seed)
    for k in range(n):
        tile_affine = Affine(*transforms[k])
        r0, c0 = int(row_off[k]), int(col_off[k])
        # values: the whole window, exact
        h, w = min(size, height - r0), min(size, width - c0)
        assert h > 0 and w > 0
        # float16 store: the reference rounded to the stored dtype (round to nearest), exactly
        np.testing.assert_array_equal(
            tiles[k, :, :h, :w], reference[:, r0 : r0 + h, c0 : c0 + w].astype(tiles.dtype)
        )
        assert np.isnan(tiles[k, :, h:, :]).all() and np.isnan(tiles[k, :, :, w:]).all()
        # geometry: random pixels inside the scene part of the tile
        rows = rng.integers(0, h, samples)
        cols = rng.integers(0, w, samples)
        for r, c in zip(rows, cols, strict=True):
            x, y = tile_affine @ (c + 0.5, r + 0.5)
            sc, sr = inverse @ (x, y)
            assert abs(sc - (c0 + c + 0.5)) < 1e-6, (k, r, c, sc)
            assert abs(sr - (r0 + r + 0.5)) < 1e-6, (k, r, c, sr)
            np.testing.assert_array_equal(
                tiles[k, :, r, c], reference[:, int(np.floor(sr)), int(np.floor(sc))].astype(tiles.dtype)
            )
    return n


@pytest.fixture
def geo_check() -> Callable[..., int]:
    """:func:`check_geo_accuracy` as a fixture."""
    return check_geo_accuracy


@pytest.fixture
def db_ref() -> Callable[[np.ndarray, str], np.ndarray]:
    """:func:`db_reference` as a fixture."""
    return db_reference


@pytest.fixture
def read_ref() -> Callable[..., np.ndarray]:
    """:func:`read_reference` as a fixture."""
    return read_reference
