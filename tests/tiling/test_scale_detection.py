"""Backscatter whose scale neither the catalog nor the item declares (issue 10): linear power is converted
to dB with the reason recorded, digital numbers and ambiguous values fail the scene with one line naming the
item and the fix, and a two-band asset gives both polarisations. Rasters are generated (names say so)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import zarr

from fusarbatch.catalog.scene import Scene
from fusarbatch.catalog.spec import CatalogSpec
from fusarbatch.errors import SceneError
from fusarbatch.tiling import tile_scene
from fusarbatch.tiling.scaling import detect_scale

#: A catalog given by URL: it declares no scale.
UNDECLARED = CatalogSpec(name="generated-api", kind="api", href="http://127.0.0.1:9/")


def _item(href: str, item_id: str = "generated-linear-power") -> dict:
    """A STAC item with one asset under the "vv" key that holds VV and VH (bands 1 and 2), no scale."""
    return {
        "id": item_id,
        "properties": {"datetime": "2024-03-01T10:00:00Z", "sar:polarizations": ["VV", "VH"]},
        "geometry": {
            "type": "Polygon",
            "coordinates": [[[14, 45], [14.1, 45], [14.1, 45.1], [14, 45.1], [14, 45]]],
        },
        "assets": {"vv": {"href": href, "sar:polarizations": ["VV", "VH"], "roles": ["data"]}},
    }


def test_undeclared_linear_power_two_band_asset_is_converted_with_its_reason(
    tmp_path, write_generated_tif, db_ref, caplog
):
    rng = np.random.default_rng(5)
    power = np.stack([rng.gamma(4.4, 0.06 / 4.4, (200, 180)), rng.gamma(4.4, 0.012 / 4.4, (200, 180))])
    power = power.astype(np.float32)  # VV ~0.06 (-12 dB), VH ~0.012 (-19 dB): linear sigma0
    path = write_generated_tif("generated_power_vv_vh.tif", power)
    scene = Scene.from_item(_item(str(path)), UNDECLARED)
    assert scene.scale == "" and scene.pols == ("VV", "VH")
    with caplog.at_level(logging.WARNING, logger="fusarbatch.tiling.scaling"):
        result = tile_scene(scene, tmp_path / "tiles.zarr", tile_size=128, overlap=16)
    assert result.status == "ok", result.error
    g = zarr.open_group(str(tmp_path / "tiles.zarr"), path=scene.safe_id, mode="r")
    assert g.attrs["pols"] == ["VV", "VH"] and g.attrs["units"] == "dB"
    assert g.attrs["scale_in"] == "power"
    detected = g.attrs["scale_detected"]
    assert detected["scale"] == "power" and "linear intensity" in detected["reason"]
    assert "scale not declared" in caplog.text and "generated-linear-power" in caplog.text
    tiles = g["backscatter"][:]
    reference = db_ref(power, "power")
    np.testing.assert_array_equal(tiles[0, :, :128, :128], reference[:, :128, :128].astype(tiles.dtype))
    tiles = tiles.astype(np.float32)  # a float16 sum over many pixels overflows
    assert -14 < np.nanmean(tiles[:, 0]) < -10 and -21 < np.nanmean(tiles[:, 1]) < -17


def test_undeclared_db_values_are_kept_and_say_why(tmp_path, demo_scenes):
    scene = dataclasses.replace(demo_scenes["camargue"], scale="")
    result = tile_scene(scene, tmp_path / "tiles.zarr", tile_size=128, overlap=16)
    assert result.status == "ok", result.error
    g = zarr.open_group(str(tmp_path / "tiles.zarr"), path=scene.safe_id, mode="r")
    assert (
        g.attrs["scale_detected"]["scale"] == "db" and "look like dB" in g.attrs["scale_detected"]["reason"]
    )


def test_undeclared_digital_numbers_without_calibration_fail_with_the_fix(tmp_path, write_generated_tif):
    dn = np.random.default_rng(1).integers(60, 600, (1, 100, 100)).astype(np.uint16)
    path = write_generated_tif("generated_dn.tif", dn)
    scene = Scene.from_item(_item(str(path), "generated-dn"), UNDECLARED)
    scene = dataclasses.replace(scene, bands={"VV": scene.bands["VV"]})
    result = tile_scene(scene, tmp_path / "tiles.zarr", tile_size=64, overlap=8)
    assert result.status == "failed" and "\n" not in result.error
    assert "'generated-dn'" in result.error and "digital numbers" in result.error
    assert "catalog TOML" in result.error
    g = zarr.open_group(str(tmp_path / "tiles.zarr"), path=scene.safe_id, mode="r")
    assert g.attrs["status"] == "failed" and "backscatter" not in g  # nothing labelled dB was stored


def test_undeclared_ambiguous_values_fail_with_the_fix(tmp_path, write_generated_tif):
    amplitude = np.random.default_rng(2).uniform(50, 400, (1, 80, 80)).astype(np.float32)  # float DN-like
    path = write_generated_tif("generated_float_amplitude.tif", amplitude)
    scene = Scene.from_item(_item(str(path), "generated-ambiguous"), UNDECLARED)
    scene = dataclasses.replace(scene, bands={"VV": scene.bands["VV"]})
    result = tile_scene(scene, tmp_path / "tiles.zarr", tile_size=64, overlap=8)
    assert result.status == "failed"
    assert result.error.startswith("item 'generated-ambiguous': the scale of the values is not declared")
    assert "set `scale` (db, power, amplitude or dn) in the catalog TOML" in result.error


def test_declared_db_that_looks_linear_is_kept_but_logged(tmp_path, write_generated_tif, make_scene, caplog):
    power = np.random.default_rng(3).gamma(4.4, 0.05 / 4.4, (1, 64, 64)).astype(np.float32)
    path = write_generated_tif("generated_power_declared_db.tif", power)
    scene = make_scene("generated-declared-db", {"VV": path}, scale="db")
    with caplog.at_level(logging.WARNING, logger="fusarbatch.tiling.scaling"):
        result = tile_scene(scene, tmp_path / "tiles.zarr", tile_size=64, overlap=8)
    assert result.status == "ok"
    assert "declared dB, but values look like linear intensity" in caplog.text


@pytest.mark.parametrize(
    ("values", "dtype", "scale"),
    [
        (lambda r: r.normal(-14, 5, 5000), "float32", "db"),  # sigma0 dB of a land scene
        (lambda r: r.normal(-22, 3, 5000), "float32", "db"),  # sea, VH
        (lambda r: r.gamma(4.4, 0.05 / 4.4, 5000), "float32", "power"),  # linear sigma0 ~0.05
        (
            lambda r: np.r_[r.gamma(4.4, 0.2 / 4.4, 4900), -r.uniform(0, 1e-3, 100)],
            "float32",
            "power",
        ),  # noise-
        (lambda r: r.integers(30, 800, 5000), "uint16", "dn"),  # GRD digital numbers
        (lambda r: r.integers(1, 255, 5000), "uint8", "dn"),  # 8-bit quick-look
    ],
    ids=["db-land", "db-sea", "power", "power-noise-subtracted", "dn-uint16", "dn-uint8"],
)
def test_detect_scale_rules(values, dtype, scale):
    sample = values(np.random.default_rng(0)).astype(np.float32)[None]
    found, reason = detect_scale(sample, (dtype,), what="item 'x'")
    assert found == scale, reason


@pytest.mark.parametrize(
    ("values", "dtype"),
    [
        (lambda r: r.uniform(50, 400, 5000), "float32"),  # float amplitude/DN
        (lambda r: r.normal(-1500, 300, 5000), "int16"),  # dB x 100 coded as integers
        (lambda r: r.uniform(0, 1e6, 5000), "float64"),  # huge non-negative floats
    ],
    ids=["float-dn", "int-coded-db", "huge"],
)
def test_detect_scale_refuses_to_guess(values, dtype):
    sample = values(np.random.default_rng(0)).astype(np.float32)[None]
    with pytest.raises(
        SceneError, match=r"^item 'x': the scale of the values is not declared and not evident \(median"
    ):
        detect_scale(sample, (dtype,), what="item 'x'")


def test_detect_scale_polarisations_must_agree_and_empty_scenes_are_db():
    rng = np.random.default_rng(0)
    mixed = np.stack([rng.normal(-14, 5, 2000), rng.gamma(4.4, 0.01, 2000)]).astype(np.float32)
    with pytest.raises(SceneError, match="polarisations look differently scaled"):
        detect_scale(mixed, ("float32", "float32"), what="item 'x'")
    empty = np.full((1, 50), np.nan, np.float32)
    assert detect_scale(empty, ("float32",), what="item 'x'")[0] == "db"
