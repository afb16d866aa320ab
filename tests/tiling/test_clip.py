"""AOI-clipped tiling: which tiles of the scene grid an AOI needs, the tiles written, what lies inside."""

from __future__ import annotations

import numpy as np
import shapely
import zarr
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st
from pyproj import Transformer
from shapely.geometry import Polygon, box

from fusarbatch.tiling import tile_scene
from fusarbatch.tiling.clip import aoi_digest, aoi_pixels, centres_inside, select_tiles
from fusarbatch.tiling.grid import tile_grid

CRS = "EPSG:32633"
SCENE = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 5_100_000.0)  # write_generated_tif's default grid
TO_LONLAT = Transformer.from_crs(CRS, "EPSG:4326", always_xy=True)


def _aoi_lonlat(c0, r0, c1, r1):
    """The pixel rectangle [c0, c1] x [r0, r1] of SCENE as a lon/lat polygon (densified)."""
    ring = box(c0, r0, c1, r1).segmentize(5)
    xy = np.asarray(ring.exterior.coords)
    x, y = SCENE * (xy[:, 0], xy[:, 1])
    return Polygon(np.column_stack(TO_LONLAT.transform(x, y)))


def test_rectangle_hand_values():
    grid = tile_grid(1000, 1200, 128, 16)  # rows: 9 origins k * 872 // 8, cols: 11 origins k * 1072 // 10
    assert grid.rows[:4] == (0, 109, 218, 327) and grid.cols[:4] == (0, 107, 214, 321)
    # rows 130..139: the last tile row starting at or before 130 is 109 (row 1), and it reaches 237;
    # cols 240..259: tile col 2 (214..341) alone
    assert select_tiles(grid, box(240, 130, 260, 140)).tolist() == [1 * 11 + 2]
    # rows 200..399: tile row 1 (109..236) for rows 200..217, row 3 (327..454) for the end, row 2 between
    ids = select_tiles(grid, box(240, 200, 260, 400))
    assert ids.tolist() == [1 * 11 + 2, 2 * 11 + 2, 3 * 11 + 2]


def test_diagonal_aoi_drops_the_tiles_it_does_not_meet():
    grid = tile_grid(1000, 1000, 128, 16)
    strip = shapely.LineString([(0, 0), (1000, 1000)]).buffer(5)
    ids = select_tiles(grid, strip.intersection(box(0, 0, 1000, 1000)))
    rows, cols = np.divmod(ids, len(grid.cols))
    assert (np.abs(rows - cols) <= 1).all()  # only tiles near the diagonal
    assert len(ids) < grid.n_tiles // 3


@settings(max_examples=60, deadline=None)
@given(
    c0=st.floats(0, 990),
    r0=st.floats(0, 690),
    w=st.floats(1, 900),
    h=st.floats(1, 600),
    angle=st.floats(0, 90),
)
def test_property_every_aoi_pixel_is_covered_and_every_tile_meets_the_aoi(c0, r0, w, h, angle):
    grid = tile_grid(700, 1000, 96, 12)
    region = shapely.affinity.rotate(box(c0, r0, c0 + w, r0 + h), angle).intersection(box(0, 0, 1000, 700))
    if region.area <= 0:
        return
    ids = select_tiles(grid, region)
    rows, cols = grid.row_offsets[ids], grid.col_offsets[ids]
    covered = np.zeros((700, 1000), bool)
    for r, c in zip(rows, cols, strict=True):
        assert box(c, r, c + 96, r + 96).intersection(region).area > 0  # each kept tile meets the AOI
        covered[r : r + 96, c : c + 96] = True
    # pixel centres inside the AOI are covered
    yy, xx = np.mgrid[0:700, 0:1000]
    inside = shapely.contains_xy(region, xx.ravel() + 0.5, yy.ravel() + 0.5).reshape(700, 1000)
    assert covered[inside].all()
    # no tile row outside the AOI's row extent
    b = region.bounds
    need_rows = {i for i, o in enumerate(grid.rows) if o < np.ceil(b[3]) and o + 96 > np.floor(b[1])}
    assert set(np.unique(ids // len(grid.cols)).tolist()) <= need_rows


def test_overlapping_aois_give_identical_tiles_where_they_overlap(tmp_path, write_generated_tif, make_scene):
    rng = np.random.default_rng(3)
    data = (rng.gamma(4.4, 1 / 4.4, size=(2, 700, 900)) * 0.05).astype(np.float32)
    data = 10 * np.log10(data)
    path = write_generated_tif("generated_clip_scene.tif", data)
    scene = make_scene("generated-clip", {"VV": path}, scale="db")
    a = _aoi_lonlat(100, 100, 400, 300)
    b = _aoi_lonlat(300, 200, 700, 500)
    for name, aoi in (("a", a), ("b", b), ("whole", None)):
        result = tile_scene(scene, tmp_path / name, tile_size=128, overlap=16, aoi=aoi)
        assert result.status == "ok", result.error
    groups = {n: zarr.open_group(str(tmp_path / n / scene.safe_id), mode="r") for n in ("a", "b", "whole")}
    whole = groups["whole"]
    assert whole.attrs["clip"] is None and whole.attrs["n_tiles"] == 7 * 8
    by_pos = {
        n: {
            (int(r), int(c)): k for k, (r, c) in enumerate(zip(g["row_off"][:], g["col_off"][:], strict=True))
        }
        for n, g in groups.items()
    }
    assert set(by_pos["a"]) < set(by_pos["whole"]) and set(by_pos["b"]) < set(by_pos["whole"])
    shared = set(by_pos["a"]) & set(by_pos["b"])
    assert shared  # the AOIs overlap: so do their tiles
    for pos in shared:
        tiles = [groups[n]["backscatter"][by_pos[n][pos]] for n in ("a", "b", "whole")]
        np.testing.assert_array_equal(tiles[0], tiles[2])
        np.testing.assert_array_equal(tiles[1], tiles[2])
    g = groups["a"]
    assert g.attrs["clip"]["aoi_digest"] == aoi_digest(a) != aoi_digest(b)
    assert g.attrs["clip"]["grid_tiles"] == 56 and g.attrs["n_tiles"] == len(g["row_off"][:]) < 56
    c0, r0, c1, r1 = g.attrs["clip"]["aoi_bounds_px"]
    assert abs(c0 - 100) < 0.01 and abs(r0 - 100) < 0.01 and abs(c1 - 400) < 0.01 and abs(r1 - 300) < 0.01
    # every AOI pixel is in a stored tile
    covered = np.zeros((700, 900), bool)
    for r, c in zip(g["row_off"][:], g["col_off"][:], strict=True):
        covered[r : r + 128, c : c + 128] = True
    assert covered[100:300, 100:400].all()


def test_aoi_missing_the_scene_stores_no_tile(tmp_path, write_generated_tif, make_scene):
    path = write_generated_tif("generated_clip_far.tif", np.full((1, 200, 200), -12.0, np.float32))
    scene = make_scene("generated-clip-far", {"VV": path})
    far = box(-60.0, -10.0, -59.0, -9.0)  # South America; the scene is in UTM 33N
    assert aoi_pixels(far, CRS, SCENE, 200, 200).is_empty
    result = tile_scene(scene, tmp_path / "tiles.zarr", tile_size=64, overlap=8, aoi=far)
    assert result.status == "ok" and result.n_tiles == 0 and result.n_inferable == 0
    g = zarr.open_group(str(tmp_path / "tiles.zarr" / scene.safe_id), mode="r")
    assert g["backscatter"].shape == (0, 1, 64, 64) and g["valid_fraction"].shape == (0,)


def test_centres_inside_hand_values():
    aoi = _aoi_lonlat(100, 100, 200, 200)
    polys = [
        box(*(SCENE * (150, 150)), *(SCENE * (160, 140))),  # centre at pixel (155, 145): inside
        box(*(SCENE * (195, 150)), *(SCENE * (215, 140))),  # centre at col 205: outside, though it overlaps
        box(*(SCENE * (300, 300)), *(SCENE * (310, 290))),
    ]
    assert centres_inside(aoi, CRS, polys).tolist() == [True, False, False]
    assert centres_inside(aoi, CRS, []).shape == (0,)
