"""``fusarbatch run`` spends the model only where the user asked (issue 11): AOI-clipped tiles, detections
inside the AOI, ``--whole-scenes``, ``--surface``, ``--prune-tiles``; on the demo camargue scene (real
STAC, GeoTIFF, Zarr, tiny model)."""

import json

import numpy as np
import shapely
import zarr
from PIL import Image
from pyproj import Transformer

from fusarbatch.config import RunConfig
from fusarbatch.outputs.geoparquet import read_dataset
from fusarbatch.outputs.ledger import collect_status
from fusarbatch.pipeline import run
from fusarbatch.tiling.landmask import SKIP_REASONS

CAMARGUE = "S1A_IW_GRD_20150309T173017_VV_camargue"
# the scene: UTM 31N, 20 m pixels, 268 x 217 px from (620048.24, 4830114.70); the AOI: its north-west
# corner, pixel columns ~2.6..72.6 and rows ~5.7..70.7
AOI_UTM = shapely.box(620_100.0, 4_828_700.0, 621_500.0, 4_830_000.0)


def _write_aoi(path):
    path.write_text(
        json.dumps(
            {
                "type": "Feature",
                "properties": {},
                "crs": {"type": "name", "properties": {"name": "EPSG:32631"}},
                "geometry": shapely.geometry.mapping(AOI_UTM),
            }
        )
    )
    return path


def test_small_aoi_tiles_infers_and_writes_only_around_it(tmp_path, generated_demo_model):
    aoi = _write_aoi(tmp_path / "generated_corner_aoi.geojson")
    base = dict(
        aoi=aoi,
        catalog="demo",
        start="2015-03-01",
        end="2015-03-31",
        out=tmp_path / "out",
        tile_size=128,
        overlap=16,
        max_new_tokens=64,
        device="cpu",
    )
    whole = run(RunConfig(**base, whole_scenes=True))
    assert [(s.scene_id, s.status, s.tiles) for s in whole.scenes] == [(CAMARGUE, "ok", 6)]  # 2 x 3 tiles
    dets_whole = read_dataset(base["out"], "detections")
    to_utm = Transformer.from_crs("EPSG:4326", "EPSG:32631", always_xy=True)

    def inside(frame):
        xy = shapely.get_coordinates(frame.geometry.centroid)
        return shapely.contains_xy(AOI_UTM, *to_utm.transform(xy[:, 0], xy[:, 1]))

    outside_before = int((~inside(dets_whole)).sum())
    assert outside_before > 0  # the whole scene has detections outside the AOI to drop

    clipped = run(RunConfig(**base))  # a changed AOI setting redoes the scene (config hash)
    assert [(s.scene_id, s.status, s.reused) for s in clipped.scenes] == [(CAMARGUE, "ok", [])]
    assert clipped.scenes[0].tiles == 1 and clipped.scenes[0].tiles_inferred == 1  # the tile at (0, 0)
    g = zarr.open_group(str(base["out"] / "tiles.zarr" / CAMARGUE), mode="r")
    assert g["row_off"][:].tolist() == [0] and g["col_off"][:].tolist() == [0]
    assert g.attrs["clip"]["grid_tiles"] == 6
    tiles = read_dataset(base["out"], "tiles")
    assert len(tiles) == 1 and tiles.status.tolist() == ["ok"] and tiles.reason.isna().all()
    detections = read_dataset(base["out"], "detections")
    assert inside(detections).all()
    counts = read_dataset(base["out"], "counts")
    assert counts["count"].tolist() == [len(detections)]
    aoi_lonlat = shapely.ops.transform(
        Transformer.from_crs("EPSG:32631", "EPSG:4326", always_xy=True).transform, AOI_UTM
    )
    assert counts.geometry.iloc[0].difference(aoi_lonlat.buffer(1e-6)).is_empty  # counted within the AOI
    # the quick-look covers the stored tile (128 px) and draws the AOI outline in yellow
    png = np.asarray(Image.open(base["out"] / "quicklooks" / f"{CAMARGUE}.png"))
    assert png.shape[:2] == (128, 128)
    assert ((png[..., 0] == 255) & (png[..., 1] == 220) & (png[..., 2] == 0)).sum() > 100

    # --surface sea: the scene's tile lies on land (1 km mask): recorded as skipped with the reason
    sea = run(RunConfig(**base, surface="sea", prune_tiles=True))
    assert sea.scenes[0].status == "ok" and sea.scenes[0].tiles_inferred == 0 and sea.prompts == 0
    tiles = read_dataset(base["out"], "tiles")
    assert tiles.status.tolist() == ["skipped"] and tiles.reason.tolist() == [SKIP_REASONS["sea"]]
    assert read_dataset(base["out"], "detections").empty
    # --prune-tiles: the scene's tiles are gone once its outputs are recorded; status reports the store
    assert not (base["out"] / "tiles.zarr" / CAMARGUE).exists()
    status = collect_status(base["out"])
    assert status["disk"]["tiles.zarr"]["bytes"] < 4096 and status["disk"]["tiles.zarr"]["complete"] == 0
