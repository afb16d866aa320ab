"""Generated AEF-format data for the features tests (nothing here is real AlphaEarth data).

``generated_aef_world`` writes, once per session, small AEF-format COGs (64 int8 bands, 10 m, nodata -128,
tiled GeoTIFFs of 256 x 256 px) whose vectors are known unit vectors quantised with the inverse of Google's
formula, plus index tables shaped like ``aef_index.parquet``:

- ``generated_aef_{2022,2023}_{31N,32N}.tif``: two side-by-side COGs straddling the UTM 31/32 boundary
  (6 deg E, 45 deg N). They overlap by ~760 m on each side of 6 deg E and hold different vectors.
- ``generated_aef_2023_31N_bottomup.tif``: the 2023 31N content stored bottom-up (positive y pixel size).
- nodata in the 2023 31N layer: a 20 x 20 block at rows 100..119, cols 20..39 (all bands), and pixel (50, 10)
  with -128 in band 5 only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
import zarr
from pyproj import CRS, Transformer
from rasterio.transform import Affine

from fusarbatch.features.alphaearth import dequantize, quantize

SIZE = 256
RES = 10.0
LON_EDGE, LAT0 = 6.0, 45.0
ZONES = {"31N": 32631, "32N": 32632}
YEARS = (2022, 2023)
NODATA_BLOCK = (slice(100, 120), slice(20, 40))  # rows 100..119, cols 20..39: west of the zone overlap
NODATA_PIXEL = (50, 10)  # band 5 only


def unit_vectors(seed: int, shape: tuple[int, int]) -> np.ndarray:
    """Known random unit vectors ``(*shape, 64) float64``."""
    v = np.random.default_rng(seed).normal(size=(*shape, 64))
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def write_aef_tif(path: Path, q: np.ndarray, transform: Affine, epsg: int, bottom_up: bool = False) -> None:
    """Write ``q (H, W, 64) int8`` (top-down rows) as a tiled AEF-format GeoTIFF.

    ``bottom_up`` stores the rows in reverse with a positive y pixel size (same geography).
    """
    h, w, _ = q.shape
    data = np.moveaxis(q, -1, 0)
    if bottom_up:
        data = data[:, ::-1, :]
        transform = Affine(transform.a, 0.0, transform.c, 0.0, -transform.e, transform.f + h * transform.e)
    profile = {
        "driver": "GTiff",
        "width": w,
        "height": h,
        "count": 64,
        "dtype": "int8",
        "crs": CRS.from_epsg(epsg),
        "transform": transform,
        "nodata": -128,
        "tiled": True,
        "blockxsize": 64,
        "blockysize": 64,
        "compress": "deflate",
        "interleave": "pixel",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.ascontiguousarray(data))
        dst.descriptions = tuple(f"A{i:02d}" for i in range(64))


def footprint_4326(transform: Affine, epsg: int, h: int = SIZE, w: int = SIZE) -> shapely.Polygon:
    """The raster's extent as an EPSG:4326 polygon (edges densified before reprojection)."""
    x0, y0 = transform.c, transform.f
    x1, y1 = transform.c + w * transform.a, transform.f + h * transform.e
    ring = shapely.segmentize(shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), 100.0)
    t = Transformer.from_crs(epsg, 4326, always_xy=True)
    xs, ys = np.asarray(ring.exterior.coords).T
    lon, lat = t.transform(xs, ys)
    return shapely.Polygon(np.column_stack([lon, lat]))


@dataclass
class AEFWorld:
    """Everything a test needs to know about the generated data."""

    root: Path
    index: Path  # GeoParquet: 4 COGs (2 zones x 2 years), relative paths
    index_bottomup: Path  # GeoParquet: the bottom-up 2023 31N COG only
    transforms: dict[str, Affine]  # north-up transform per zone
    q: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # (zone, year) -> (H, W, 64) int8
    truth: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # float unit vectors
    frame: gpd.GeoDataFrame | None = None

    def lonlat(self, zone: str, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel centres of (rows, cols) of a zone's COG, as lon/lat (pyproj inverse)."""
        t = self.transforms[zone]
        x = t.c + (np.asarray(cols) + 0.5) * t.a
        y = t.f + (np.asarray(rows) + 0.5) * t.e
        lon, lat = Transformer.from_crs(ZONES[zone], 4326, always_xy=True).transform(x, y)
        return np.asarray(lon), np.asarray(lat)

    def pixel(self, zone: str, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, cols, inside) of lon/lat in a zone's north-up COG, computed independently of the reader."""
        t = self.transforms[zone]
        x, y = Transformer.from_crs(4326, ZONES[zone], always_xy=True).transform(lon, lat)
        cols = np.floor((np.asarray(x) - t.c) / t.a).astype(int)
        rows = np.floor((t.f - np.asarray(y)) / -t.e).astype(int)
        inside = (rows >= 0) & (rows < SIZE) & (cols >= 0) & (cols < SIZE)
        return rows, cols, inside

    def expected(
        self, zone: str, year: int, rows: np.ndarray, cols: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """De-quantised vectors and validity at pixels of a layer."""
        return dequantize(self.q[(zone, year)][rows, cols])


def _zone_transform(zone: str, west_m: float) -> Affine:
    """North-up 10 m transform whose raster starts ``west_m`` metres west of (6 E, 45 N) in that zone."""
    x, y = Transformer.from_crs(4326, ZONES[zone], always_xy=True).transform(LON_EDGE, LAT0)
    x0 = math.floor((x - west_m) / RES) * RES
    y_top = math.ceil((y + SIZE * RES / 2) / RES) * RES
    return Affine(RES, 0.0, x0, 0.0, -RES, y_top)


@pytest.fixture(scope="session")
def generated_aef_world(tmp_path_factory: pytest.TempPathFactory) -> AEFWorld:
    root = tmp_path_factory.mktemp("generated_aef")
    transforms = {"31N": _zone_transform("31N", 1800.0), "32N": _zone_transform("32N", 760.0)}
    world = AEFWorld(root, root / "aef_index.parquet", root / "aef_index_bottomup.parquet", transforms)
    rows = []
    for k, (zone, year) in enumerate((z, y) for z in ZONES for y in YEARS):
        truth = unit_vectors(1000 + k, (SIZE, SIZE))
        q = quantize(truth)
        if (zone, year) == ("31N", 2023):
            q[NODATA_BLOCK] = -128
            q[NODATA_PIXEL][5] = -128
        world.truth[(zone, year)] = truth
        world.q[(zone, year)] = q
        name = f"generated_aef_{year}_{zone}.tif"
        write_aef_tif(root / name, q, transforms[zone], ZONES[zone])
        x0, y0 = transforms[zone].c, transforms[zone].f
        rows.append(
            {
                "path": name,  # relative to the index: resolved by the reader
                "crs": f"EPSG:{ZONES[zone]}",
                "year": year,
                "utm_zone": zone,
                "utm_west": x0,
                "utm_south": y0 - SIZE * RES,
                "utm_east": x0 + SIZE * RES,
                "utm_north": y0,
                "geometry": footprint_4326(transforms[zone], ZONES[zone]),
            }
        )
    frame = gpd.GeoDataFrame(rows, geometry="geometry", crs=4326)
    b = frame.geometry.bounds
    for side, col in (("west", "minx"), ("south", "miny"), ("east", "maxx"), ("north", "maxy")):
        frame[f"wgs84_{side}"] = b[col]
    frame.to_parquet(world.index)
    world.frame = frame

    bu = "generated_aef_2023_31N_bottomup.tif"
    write_aef_tif(root / bu, world.q[("31N", 2023)], transforms["31N"], ZONES["31N"], bottom_up=True)
    one = frame[(frame.year == 2023) & (frame.utm_zone == "31N")].copy()
    one["path"] = str(root / bu)  # absolute path this time
    one.to_parquet(world.index_bottomup)
    return world


# ------------------------------------------------------------------------------------------------
# tile store (DESIGN 3.2 layout, built directly with zarr)

SCENE_PIXEL = 20.0
TILE_SIZE = 32  # 640 m tiles: 8 x 8 anchors 80 m apart
#: the group attr fusarbatch.tiling.store writes (its transform rows are in affine order)
TILER_ORDER_ATTR = "a,b,c,d,e,f (affine/rasterio): x = a*col + b*row + c, y = d*col + e*row + f"


def write_scene_group(
    store: Path,
    scene_id: str,
    affines: list[Affine],
    *,
    epsg: int = 32631,
    datetime: str = "2023-06-01T05:30:12Z",
    tile_size: int = TILE_SIZE,
    order: str = "affine",
    complete: bool = True,
    transform_order_attr: str | None = TILER_ORDER_ATTR,
) -> None:
    """A scene group as the tiler writes it (transform rows in ``order``: 'affine' or 'gdal').

    ``transform_order_attr`` defaults to the attr the tiler writes (affine order); pass None to omit it.
    """
    root = zarr.open_group(str(store), mode="a")
    g = root.create_group(scene_id, overwrite=True)
    t = len(affines)
    rows = [list(a)[:6] if order == "affine" else list(a.to_gdal()) for a in affines]
    g.create_array(
        "transform", shape=(t, 6), dtype="float64", chunks=(1, 6), dimension_names=("tile", "coef")
    )
    bs = g.create_array(
        "backscatter",
        shape=(t, 1, tile_size, tile_size),
        dtype="float32",
        chunks=(1, 1, tile_size, tile_size),
        dimension_names=("tile", "pol", "y", "x"),
        fill_value=float("nan"),
    )
    for name in ("row_off", "col_off"):
        g.create_array(name, shape=(t,), dtype="int64", chunks=(1,), dimension_names=("tile",))
    vf = g.create_array("valid_fraction", shape=(t,), dtype="float32", chunks=(1,), dimension_names=("tile",))
    if t:
        g["transform"][...] = np.asarray(rows, np.float64)
        bs[...] = np.full((t, 1, tile_size, tile_size), -12.0, np.float32)
        vf[...] = np.ones(t, np.float32)
    attrs = {
        "crs": CRS.from_epsg(epsg).to_wkt(),
        "item_id": scene_id,
        "datetime": datetime,
        "pols": ["VV"],
        "quantity": "sigma0",
        "tile_size": tile_size,
        "overlap": 0,
        "source_hrefs": [],
    }
    if transform_order_attr:
        attrs["transform_order"] = transform_order_attr
    g.attrs.update(attrs)
    g.attrs["complete"] = complete


def scene_tiles(world: AEFWorld) -> dict[str, Affine]:
    """Tile affines (EPSG:32631, 20 m pixels) for the standard scene, by role.

    Origins are offset 5 m from the 10 m AEF grid so that every anchor of a tile falls on a 31N pixel
    centre, never on a pixel edge.
    """
    t31 = world.transforms["31N"]
    x_edge, _ = Transformer.from_crs(4326, 32631, always_xy=True).transform(LON_EDGE, LAT0)
    top = t31.f - 5.0 - 40 * RES  # 400 m below the COG's top edge
    x_edge_grid = math.floor(x_edge / RES) * RES + 5.0

    def tile(x0: float, y0: float) -> Affine:
        return Affine(SCENE_PIXEL, 0.0, x0, 0.0, -SCENE_PIXEL, y0)

    return {
        "west": tile(t31.c + 5.0 + 40 * RES, top),  # 31N only, clear of the nodata block
        "straddle": tile(x_edge_grid - 320.0, top),  # across 6 E: half 31N, half 32N
        # covers the nodata block (rows 100..119, cols 20..39) partly: the tile starts at row 95, col 15
        "nodata": tile(t31.c + 5.0 + 15 * RES, t31.f - 5.0 - 95 * RES),
        "nowhere": tile(t31.c - 200_000.0, top),  # 200 km west: no COG
    }
