"""GeoParquet 1.1 writers: schema, covering bbox, partitioning, atomic replace."""

import datetime as dt
import json

import geopandas as gpd
import pyarrow.parquet as pq
import shapely

from fusarbatch.outputs.geoparquet import count_column, partition_path, read_dataset, write_table

WHEN = dt.datetime(2024, 1, 2, 23, 59, tzinfo=dt.UTC)


def det(i, label="ship", x=4.5):
    return {
        "detection_id": f"d{i}",
        "scene_id": "S1",
        "tile_id": i,
        "datetime": WHEN,
        "label": label,
        "score": 0.5 + i / 10,
        "model_id": "m",
        "run_id": "r",
        "geometry": shapely.box(x + i * 0.01, 43.5, x + i * 0.01 + 0.001, 43.501),
    }


def test_detections_round_trip_with_geoparquet_1_1_metadata(tmp_path):
    path = write_table([det(0), det(1, "plane")], tmp_path, "detections", WHEN, "S1")
    assert path == tmp_path / "detections" / "date=2024-01-02" / "S1.parquet"
    geo = json.loads(pq.read_schema(path).metadata[b"geo"])
    assert geo["version"] == "1.1.0"
    assert geo["columns"]["geometry"]["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]
    assert geo["columns"]["geometry"]["crs"]["id"]["code"] == 4326
    back = gpd.read_parquet(path)
    assert list(back.label) == ["ship", "plane"]
    assert str(back.tile_id.dtype) in ("int32", "Int32")
    assert back.datetime.iloc[0] == WHEN
    assert back.geometry.iloc[1].equals(det(1)["geometry"])
    # bbox filtering through the covering column
    only_first = gpd.read_parquet(path, bbox=(4.4999, 43.4999, 4.5002, 43.5011))
    assert list(only_first.detection_id) == ["d0"]


def test_rewrite_replaces_rows_and_leaves_no_temporary_file(tmp_path):
    write_table([det(0), det(1)], tmp_path, "detections", WHEN, "S1")
    write_table([det(2)], tmp_path, "detections", WHEN, "S1")
    write_table([det(3)], tmp_path, "detections", WHEN + dt.timedelta(days=1), "S2")
    all_rows = read_dataset(tmp_path, "detections")
    assert sorted(all_rows.detection_id) == ["d2", "d3"]
    assert sorted(all_rows.date) == ["2024-01-02", "2024-01-03"]
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]


def test_empty_table_keeps_its_schema(tmp_path):
    path = write_table([], tmp_path, "counts", WHEN, "S1")
    schema = pq.read_schema(path)
    assert {"scene_id", "label", "count", "geometry", "bbox"} <= set(schema.names)
    assert gpd.read_parquet(path).empty


def test_tiles_table_takes_count_columns(tmp_path):
    row = {
        "scene_id": "S1",
        "tile_id": 0,
        "datetime": WHEN,
        "status": "ok",
        count_column("Ship"): 3,
        "geometry": shapely.box(4, 43, 4.1, 43.1),
    }
    path = write_table([row, {**row, "tile_id": 1, "status": "skipped"}], tmp_path, "tiles", WHEN, "S1")
    back = gpd.read_parquet(path)
    assert list(back["count_ship"]) == [3, 3]
    assert list(back.status) == ["ok", "skipped"]
    assert back.error.isna().all()


def test_partition_path_uses_utc_date(tmp_path):
    local = dt.datetime(2024, 1, 3, 0, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert partition_path(tmp_path, "tiles", local, "X").parent.name == "date=2024-01-02"


def test_output_names_never_start_with_underscore_or_dot_so_dataset_readers_see_every_scene(tmp_path):
    """pyarrow's and geopandas' dataset readers skip files named ``_*`` or ``.*``: ``read_parquet`` of the
    folder dropped such scenes without a word (issue 10). Item ids that begin that way (or whose
    forbidden first characters become ``_``) get names that do not, readable and distinct."""
    from fusarbatch.catalog.scene import Scene

    ids = ["_hidden", ".dot", "@at", "__", "._x", "_x", "x"]
    names = [Scene(i, WHEN, shapely.box(0, 0, 1, 1), {}).safe_id for i in ids]
    assert not [n for n in names if n[0] in "._"], names
    assert len(set(names)) == len(ids) and names[-1] == "x" and names[0].startswith("hidden-")
    for i, name in zip(ids, names, strict=True):
        write_table([det(0) | {"scene_id": i}], tmp_path, "detections", WHEN, name)
    assert sorted(gpd.read_parquet(tmp_path / "detections").scene_id) == sorted(ids)
