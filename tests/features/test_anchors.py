"""Anchor grid, tile-store features and the training anchor file formats."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import zarr
from pyproj import Transformer
from rasterio.transform import Affine

from fusarbatch.errors import UsageError
from fusarbatch.features.alphaearth import AEF_ATTRIBUTION, COGIndexSource, NullSource
from fusarbatch.features.anchors import (
    LEGACY_COLUMNS,
    anchor_lonlat,
    anchor_positions,
    compute_features,
    read_anchor_npz,
    read_legacy_anchors,
    read_scene_features,
    tile_affines,
    write_anchor_npz,
    write_legacy_anchors,
    write_scene_features,
)

from .conftest import NODATA_BLOCK, SCENE_PIXEL, TILE_SIZE, scene_tiles, write_scene_group

assert SCENE_PIXEL == 20.0  # test_nodata_tile_mask_matches_the_block assumes 20 m tiles over 10 m AEF

ROLES = ("west", "straddle", "nodata", "nowhere")


def test_anchor_positions_are_cell_centres_in_raster_order():
    pos = anchor_positions(8)
    assert pos.shape == (64, 2) and pos.dtype == np.float32
    np.testing.assert_allclose(pos[0], [0.0625, 0.0625])
    np.testing.assert_allclose(pos[1], [0.0625, 0.1875])  # s = i * n + j: x moves first
    np.testing.assert_allclose(pos[8], [0.1875, 0.0625])
    np.testing.assert_allclose(pos[63], [0.9375, 0.9375])
    np.testing.assert_allclose(anchor_positions(1), [[0.5, 0.5]])
    edges = anchor_positions(3, grid="edges")
    np.testing.assert_allclose(edges[:, 0], [0, 0, 0, 0.5, 0.5, 0.5, 1, 1, 1])
    np.testing.assert_allclose(edges[:, 1], [0, 0.5, 1] * 3)
    with pytest.raises(ValueError):
        anchor_positions(0)
    with pytest.raises(ValueError):
        anchor_positions(1, grid="edges")


def test_tile_affines_reads_both_orders_and_refuses_ambiguity():
    a = Affine(20.0, 0.0, 700_000.0, 0.0, -20.0, 5_000_000.0)
    b = Affine(20.0, 0.0, 700_640.0, 0.0, 20.0, 4_000_000.0)  # bottom-up tile
    affine_rows = np.array([list(a)[:6], list(b)[:6]])
    gdal_rows = np.array([a.to_gdal(), b.to_gdal()])
    np.testing.assert_array_equal(tile_affines(affine_rows), affine_rows)
    np.testing.assert_array_equal(tile_affines(gdal_rows), affine_rows)
    np.testing.assert_array_equal(tile_affines(gdal_rows, "gdal"), affine_rows)
    rotated = Affine.rotation(10) @ a
    with pytest.raises(ValueError, match="transform_order"):
        tile_affines([list(rotated)[:6]])
    np.testing.assert_allclose(tile_affines([list(rotated)[:6]], "affine")[0], list(rotated)[:6])


def test_anchor_lonlat_maps_tile_positions_through_the_affine():
    a = Affine(20.0, 0.0, 735_000.0, 0.0, -20.0, 4_985_000.0)
    lon, lat, pos = anchor_lonlat([list(a)[:6]], "EPSG:32631", height=32, width=48, n=4)
    assert lon.shape == lat.shape == (1, 16)
    x, y = Transformer.from_crs(4326, 32631, always_xy=True).transform(lon[0], lat[0])
    # anchor (i, j) sits at pixel (col, row) = ((j + 0.5) * 48 / 4, (i + 0.5) * 32 / 4)
    i, j = np.divmod(np.arange(16), 4)
    np.testing.assert_allclose(x, 735_000.0 + (j + 0.5) * 12 * 20.0, atol=1e-6)
    np.testing.assert_allclose(y, 4_985_000.0 - (i + 0.5) * 8 * 20.0, atol=1e-6)
    np.testing.assert_allclose(pos[:, 0], (i + 0.5) / 4)


def _expected_for_tile(world, affine: Affine, year: int, n: int = 8):
    """Expected features/mask of a tile, computed from the fixture's ground truth and its own geometry."""
    i, j = np.divmod(np.arange(n * n), n)
    x = affine.c + (j + 0.5) / n * TILE_SIZE * affine.a
    y = affine.f + (i + 0.5) / n * TILE_SIZE * affine.e
    lon, lat = Transformer.from_crs(32631, 4326, always_xy=True).transform(x, y)
    lon, lat = np.asarray(lon), np.asarray(lat)
    feats = np.zeros((n * n, 64), np.float32)
    mask = np.zeros(n * n, bool)
    for zone in ("31N", "32N"):  # a point belongs to the zone of its longitude (6 E is the boundary)
        sel = (lon >= 6.0) if zone == "32N" else (lon < 6.0)
        rows, cols, inside = world.pixel(zone, lon, lat)
        use = sel & inside
        f, v = world.expected(zone, year, rows[use], cols[use])
        feats[use] = f
        mask[use] = v
    return feats, mask


@pytest.fixture
def scene_store(tmp_path, generated_aef_world):
    tiles = scene_tiles(generated_aef_world)
    store = tmp_path / "tiles.zarr"
    write_scene_group(store, "S1A_2023", [tiles[r] for r in ROLES])
    return store, tiles


def test_write_scene_features_shapes_values_and_attrs(scene_store, generated_aef_world):
    store, tiles = scene_store
    w = generated_aef_world
    result = write_scene_features(store, "S1A_2023", COGIndexSource(w.index, name="generated"), n=8)

    g = zarr.open_group(str(store), mode="r")["S1A_2023"]
    feats, pos, mask = g["aef_features"], g["aef_positions"], g["aef_mask"]
    assert (feats.shape, feats.dtype) == ((4, 64, 64), np.float16)
    assert (pos.shape, pos.dtype) == ((4, 64, 2), np.float32)
    assert (mask.shape, mask.dtype) == ((4, 64), np.bool_)
    assert feats.chunks == (1, 64, 64) and mask.chunks == (1, 64)
    assert feats.metadata.dimension_names == ("tile", "anchor", "band")
    assert mask.metadata.dimension_names == ("tile", "anchor")
    np.testing.assert_array_equal(pos[...], np.broadcast_to(anchor_positions(8), (4, 64, 2)))

    f, m = feats[...].astype(np.float32), mask[...]
    for t, role in enumerate(ROLES):
        ef, em = _expected_for_tile(w, tiles[role], 2023)
        np.testing.assert_array_equal(m[t], em, err_msg=role)
        np.testing.assert_allclose(f[t], ef, atol=1e-3, err_msg=role)  # float16 storage
        assert not f[t][~m[t]].any()
    assert m[0].all() and not m[3].any()
    assert 0 < m[2].sum() < 64  # some anchors of the nodata tile fall in the block
    # the straddling tile reads both zones
    lon, _, _ = anchor_lonlat([list(tiles["straddle"])[:6]], "EPSG:32631", TILE_SIZE, TILE_SIZE)
    assert (lon < 6).any() and (lon > 6).any() and m[1].all()

    assert g.attrs["aef_complete"] is True
    assert g.attrs["aef_source"] == "generated" and g.attrs["aef_year"] == 2023
    assert g.attrs["aef_n"] == 8 and g.attrs["aef_attribution"] == AEF_ATTRIBUTION
    assert g.attrs["aef_coverage"] == pytest.approx(m.mean())
    assert g.attrs["complete"] is True  # the tiler's attrs are kept
    assert result.coverage == pytest.approx(m.mean()) and result.n_tiles == 4 and result.n_anchors == 64
    assert result.aef_year == 2023 and result.acquisition_year == 2023 and result.error is None

    rf, rp, rm = read_scene_features(store, "S1A_2023")
    assert rf.dtype == np.float32 and rf.shape == (4, 64, 64)
    np.testing.assert_array_equal(rm, m)
    np.testing.assert_array_equal(rp, pos[...])


def test_nodata_tile_mask_matches_the_block(scene_store, generated_aef_world):
    store, _ = scene_store
    write_scene_features(store, "S1A_2023", COGIndexSource(generated_aef_world.index))
    m = read_scene_features(store, "S1A_2023")[2][2]
    # the tile starts at COG row 95 / col 15 with 20 m pixels: anchor (i, j) is at COG pixel
    # (95 + 4 * (2 i + 1), 15 + 4 * (2 j + 1)) (10 m pixels, 80 m apart)
    i, j = np.divmod(np.arange(64), 8)
    rows, cols = 95 + 8 * i + 4, 15 + 8 * j + 4
    rs, cs = NODATA_BLOCK
    in_block = (rows >= rs.start) & (rows < rs.stop) & (cols >= cs.start) & (cols < cs.stop)
    np.testing.assert_array_equal(m, ~in_block)


def test_gdal_order_transforms_give_the_same_features(tmp_path, scene_store, generated_aef_world):
    store, tiles = scene_store
    src = COGIndexSource(generated_aef_world.index)
    write_scene_features(store, "S1A_2023", src)
    reference = read_scene_features(store, "S1A_2023")
    variants = {  # (row order, group attr) -> read the same
        "gdal_detected": ("gdal", None),
        "gdal_declared": ("gdal", "gdal"),
        "affine_detected": ("affine", None),
        "affine_unknown_attr": ("affine", "something else"),
    }
    for name, (order, attr) in variants.items():
        other = tmp_path / f"{name}.zarr"
        write_scene_group(
            other, "S1A_2023", [tiles[r] for r in ROLES], order=order, transform_order_attr=attr
        )
        write_scene_features(other, "S1A_2023", src)
        for x, y in zip(reference, read_scene_features(other, "S1A_2023"), strict=True):
            np.testing.assert_array_equal(x, y, err_msg=name)
    # a declared order wins over detection: GDAL rows declared affine put every anchor off the map
    wrong = tmp_path / "wrong.zarr"
    write_scene_group(wrong, "S1A_2023", [tiles[r] for r in ROLES], order="gdal")  # with the tiler's attr
    assert write_scene_features(wrong, "S1A_2023", src).coverage == 0.0
    assert write_scene_features(wrong, "S1A_2023", src, transform_order="gdal").coverage > 0.5


def test_acquisition_year_selects_the_layer(tmp_path, generated_aef_world):
    w = generated_aef_world
    tiles = scene_tiles(w)
    store = tmp_path / "tiles.zarr"
    write_scene_group(store, "S1B_2022", [tiles["west"]], datetime="2022-12-31T23:59:59+00:00")
    write_scene_group(store, "S1A_2019", [tiles["west"]], datetime="2019-03-01T00:00:00Z")
    src = COGIndexSource(w.index)
    r22 = write_scene_features(store, "S1B_2022", src)
    r19 = write_scene_features(store, "S1A_2019", src)
    assert (r22.aef_year, r19.aef_year, r19.acquisition_year) == (2022, 2022, 2019)
    f22 = read_scene_features(store, "S1B_2022")[0][0]
    ef22, _ = _expected_for_tile(w, tiles["west"], 2022)
    ef23, _ = _expected_for_tile(w, tiles["west"], 2023)
    np.testing.assert_allclose(f22, ef22, atol=1e-3)
    assert np.abs(f22 - ef23).max() > 0.1
    np.testing.assert_array_equal(
        read_scene_features(store, "S1A_2019")[0], read_scene_features(store, "S1B_2022")[0]
    )


def test_null_source_and_empty_group(tmp_path, generated_aef_world):
    tiles = scene_tiles(generated_aef_world)
    store = tmp_path / "tiles.zarr"
    write_scene_group(store, "one", [tiles["west"]])
    write_scene_group(store, "empty", [])
    r = write_scene_features(store, "one", NullSource())
    f, p, m = read_scene_features(store, "one")
    assert not m.any() and not f.any() and p.shape == (1, 64, 2)
    assert r.coverage == 0.0 and r.aef_year is None and r.source == "none"
    g = zarr.open_group(str(store), mode="r")
    assert g["one"].attrs["aef_year"] is None and g["one"].attrs["aef_complete"] is True
    r = write_scene_features(store, "empty", COGIndexSource(generated_aef_world.index), n=4)
    f, p, m = read_scene_features(store, "empty")
    assert f.shape == (0, 16, 64) and p.shape == (0, 16, 2) and m.shape == (0, 16)
    assert r.coverage == 0.0 and r.n_tiles == 0


def test_a_crash_mid_write_leaves_the_group_incomplete(scene_store, generated_aef_world, monkeypatch):
    store, _ = scene_store
    src = COGIndexSource(generated_aef_world.index)
    write_scene_features(store, "S1A_2023", src)
    real = zarr.Group.create_array

    def failing(self, name, **kw):
        if name == "aef_mask":
            raise OSError("disk full")
        return real(self, name, **kw)

    monkeypatch.setattr(zarr.Group, "create_array", failing)
    with pytest.raises(OSError, match="disk full"):
        write_scene_features(store, "S1A_2023", src, n=4)
    monkeypatch.undo()
    assert zarr.open_group(str(store), mode="r")["S1A_2023"].attrs["aef_complete"] is False
    with pytest.raises(KeyError, match="no complete AEF features"):
        read_scene_features(store, "S1A_2023")


def test_missing_group_or_attrs_are_usage_errors(tmp_path, generated_aef_world):
    store = tmp_path / "tiles.zarr"
    write_scene_group(store, "s", [scene_tiles(generated_aef_world)["west"]])
    with pytest.raises(UsageError, match="no tile store there"):
        compute_features(tmp_path / "absent.zarr", NullSource())
    with pytest.raises(UsageError, match="'other' is not in the tile store"):
        write_scene_features(store, "other", NullSource())
    g = zarr.open_group(str(store), mode="r+")["s"]
    del g.attrs["datetime"]
    with pytest.raises(UsageError, match="datetime"):
        write_scene_features(store, "s", NullSource())


def test_compute_features_does_complete_scenes_only(tmp_path, generated_aef_world):
    tiles = scene_tiles(generated_aef_world)
    store = tmp_path / "tiles.zarr"
    write_scene_group(store, "b_scene", [tiles["west"], tiles["nowhere"]])
    write_scene_group(store, "a_scene", [tiles["straddle"]])
    write_scene_group(store, "c_partial", [tiles["west"]], complete=False)
    results = compute_features(store, COGIndexSource(generated_aef_world.index), n=4)
    assert [r.scene_id for r in results] == ["a_scene", "b_scene"]
    assert [r.coverage for r in results] == [1.0, 0.5]
    assert "aef_complete" not in zarr.open_group(str(store), mode="r")["c_partial"].attrs
    with pytest.raises(UsageError, match="c_partial"):
        compute_features(store, NullSource(), scene_ids=["a_scene", "c_partial"])
    assert [r.scene_id for r in compute_features(store, NullSource(), scene_ids=["b_scene"])] == ["b_scene"]


def test_compute_features_goes_on_with_empty_masks_when_the_source_fails(
    tmp_path, generated_aef_world, caplog
):
    w = generated_aef_world
    frame = w.frame.copy()
    frame["path"] = [str(tmp_path / "gone" / p) for p in frame["path"]]  # every COG unreachable
    frame.to_parquet(tmp_path / "index.parquet")
    tiles = scene_tiles(w)
    store = tmp_path / "tiles.zarr"
    for name in ("s1", "s2", "s3"):
        write_scene_group(store, name, [tiles["west"]])
    with caplog.at_level(logging.WARNING):
        results = compute_features(store, COGIndexSource(tmp_path / "index.parquet"))
    assert [r.coverage for r in results] == [0.0, 0.0, 0.0]
    assert all(r.error and "gone" in r.error for r in results)
    assert len([r for r in caplog.records if "disabled" in r.message]) == 1  # said once
    g = zarr.open_group(str(store), mode="r")
    assert g["s3"].attrs["aef_complete"] is True and g["s3"].attrs["aef_source"].startswith("none")
    assert "gone" in g["s3"].attrs["aef_error"]
    from fusarbatch.features.alphaearth import AEFUnavailable

    with pytest.raises(AEFUnavailable):
        compute_features(store, COGIndexSource(tmp_path / "index.parquet"), on_unavailable="raise")


# ---------------------------------------------------------------------------------------------- npz


def test_npz_round_trip_and_mask_drops_invalid_rows(tmp_path):
    rng = np.random.default_rng(3)
    f = rng.normal(size=(16, 64)).astype(np.float32)
    p = anchor_positions(4)
    mask = np.arange(16) % 3 != 0
    assert write_anchor_npz(tmp_path / "a.npz", f, p, mask) == mask.sum()
    rf, rp = read_anchor_npz(tmp_path / "a.npz")
    assert rf.dtype == rp.dtype == np.float32
    np.testing.assert_array_equal(rf, f[mask])
    np.testing.assert_array_equal(rp, p[mask])
    with np.load(tmp_path / "a.npz") as z:  # exactly the official keys
        assert sorted(z.files) == ["features", "positions"]


def test_npz_reader_accepts_official_files_and_rejects_bad_ones(tmp_path):
    f = np.ones((2, 64), np.float64)  # official files may hold float64: read as float32
    np.savez(tmp_path / "ok.npz", features=f, positions=np.array([[0.0, 1.0], [0.5, 0.25]]))
    rf, rp = read_anchor_npz(tmp_path / "ok.npz")
    assert rf.dtype == np.float32 and rp.tolist() == [[0.0, 1.0], [0.5, 0.25]]
    np.savez(tmp_path / "bad_pos.npz", features=f, positions=np.array([[0.0, 1.5], [0.5, 0.25]]))
    np.savez(tmp_path / "bad_dim.npz", features=np.ones((2, 63)), positions=np.zeros((2, 2)))
    np.savez(tmp_path / "no_pos.npz", features=f)
    for name, msg in (("bad_pos", r"\[0, 1\]"), ("bad_dim", r"\[S, 64\]"), ("no_pos", "positions")):
        with pytest.raises(ValueError, match=msg):
            read_anchor_npz(tmp_path / f"{name}.npz")
    with pytest.raises(ValueError, match="S > 0"):
        write_anchor_npz(tmp_path / "none.npz", f, np.zeros((2, 2)), mask=[False, False])


def test_legacy_70_column_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    s = 9
    feats = rng.normal(size=(s, 64))
    x = np.array([10, 20, 30] * 3, float)  # pixel x (column) 10..30
    y = np.repeat([100.0, 150.0, 300.0], 3)  # pixel y (row) 100..300, uneven spacing
    arr = write_legacy_anchors(
        tmp_path / "a.npy", np.linspace(5, 6, s), np.linspace(45, 46, s), y // 10, x // 10, x, y, feats
    )
    assert arr.shape == (s, 70) and len(LEGACY_COLUMNS) == 70
    rf, rp = read_legacy_anchors(tmp_path / "a.npy")
    np.testing.assert_allclose(rf, feats.astype(np.float32))
    np.testing.assert_allclose(rp[:, 1], (x - 10) / 20)  # x min-max normalised
    np.testing.assert_allclose(rp[:, 0], (y - 100) / 200)  # y min-max normalised
    # flat array of S * 70 values is accepted too; a constant column normalises to 0
    flat = arr.copy()
    flat[:, 5] = 7.0
    rf2, rp2 = read_legacy_anchors(flat.ravel())
    assert not rp2[:, 0].any() and np.allclose(rp2[:, 1], rp[:, 1])
    np.testing.assert_array_equal(rf2, rf)
    with pytest.raises(ValueError, match=r"\[S, 70\]"):
        read_legacy_anchors(np.zeros((3, 69)))


def test_legacy_structured_array(tmp_path):
    s = 4
    dtype = [(n, "f8") for n in ("lon", "lat", "row", "col")] + [(f"a{i}", "f4") for i in range(63, -1, -1)]
    rec = np.zeros(s, dtype=dtype)  # no x/y fields: falls back to col/row; band fields out of order
    rec["row"] = [0, 0, 10, 10]
    rec["col"] = [0, 5, 0, 5]
    for i in range(64):
        rec[f"a{i}"] = i
    np.save(tmp_path / "rec.npy", rec)
    rf, rp = read_legacy_anchors(tmp_path / "rec.npy")
    np.testing.assert_array_equal(rf[0], np.arange(64, dtype=np.float32))  # sorted A0..A63
    np.testing.assert_array_equal(rp, [[0, 0], [0, 1], [1, 0], [1, 1]])


def test_acquisition_year_is_the_utc_year(tmp_path, generated_aef_world):
    tiles = scene_tiles(generated_aef_world)
    store = tmp_path / "tiles.zarr"
    write_scene_group(store, "late", [tiles["west"]], datetime="2022-12-31T23:30:00-02:00")  # 2023 UTC
    r = write_scene_features(store, "late", COGIndexSource(generated_aef_world.index))
    assert (r.acquisition_year, r.aef_year) == (2023, 2023)
