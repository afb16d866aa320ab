"""load_aoi: GeoJSON shapes, declared CRS, antimeridian split, untrusted-file errors; geodesic coverage."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely
from conftest import DEMO_AOIS, equal_area_share
from pyproj import Geod
from shapely.geometry import MultiPolygon, Polygon, box

from fusarbatch.catalog.aoi import AOI, MAX_AOI_BYTES, fix_antimeridian, geodesic_area, load_aoi
from fusarbatch.errors import AOIError

CAMARGUE = (4.49, 43.58, 4.55, 43.61)
GEOD = Geod(ellps="WGS84")


def write_generated(tmp_path: Path, name: str, doc: object) -> Path:
    path = tmp_path / f"generated_{name}.geojson"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def polygon(*bounds: float) -> dict:
    return json.loads(shapely.to_geojson(box(*bounds)))


# ---- accepted shapes -----------------------------------------------------------------------------------


def test_feature():
    aoi = load_aoi(DEMO_AOIS / "camargue.geojson")
    assert isinstance(aoi.geometry, Polygon)
    assert aoi.parts == (aoi.geometry,)
    assert aoi.bboxes == (CAMARGUE,)
    assert aoi.source == DEMO_AOIS / "camargue.geojson"


def test_feature_collection_is_union_of_features():
    aoi = load_aoi(DEMO_AOIS / "demo_all.geojson")
    assert isinstance(aoi.geometry, MultiPolygon)
    assert sorted(aoi.bboxes) == sorted(
        [CAMARGUE, (37.82, -17.06, 37.86, -17.02), (33.0, -18.6, 33.6, -18.0)]
    )


def test_overlapping_features_merge_into_one_part(tmp_path):
    doc = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "properties": {}, "geometry": polygon(0, 0, 2, 1)},
            {"type": "Feature", "properties": {}, "geometry": polygon(1, 0, 3, 1)},
        ],
    }
    aoi = load_aoi(write_generated(tmp_path, "overlap", doc))
    assert len(aoi.parts) == 1
    assert aoi.bboxes == ((0.0, 0.0, 3.0, 1.0),)
    assert aoi.geometry.area == pytest.approx(3.0)


def test_bare_polygon():
    aoi = load_aoi(DEMO_AOIS / "mozambique.geojson")
    assert aoi.bboxes == ((33.0, -18.6, 33.6, -18.0),)
    assert aoi.geometry.area == pytest.approx(0.36)


def test_bare_multipolygon_and_geometry_collection(tmp_path):
    multi = {
        "type": "MultiPolygon",
        "coordinates": [polygon(0, 0, 1, 1)["coordinates"], polygon(5, 5, 6, 6)["coordinates"]],
    }
    aoi = load_aoi(write_generated(tmp_path, "multi", multi))
    assert sorted(aoi.bboxes) == [(0.0, 0.0, 1.0, 1.0), (5.0, 5.0, 6.0, 6.0)]
    collection = {"type": "GeometryCollection", "geometries": [polygon(0, 0, 1, 1), polygon(5, 5, 6, 6)]}
    assert sorted(load_aoi(write_generated(tmp_path, "gc", collection)).bboxes) == sorted(aoi.bboxes)


def test_clockwise_ring_gives_same_area(tmp_path):
    cw = {"type": "Polygon", "coordinates": [[[0, 0], [0, 1], [1, 1], [1, 0], [0, 0]]]}
    ccw = {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]]}
    a = load_aoi(write_generated(tmp_path, "cw", cw))
    b = load_aoi(write_generated(tmp_path, "ccw", ccw))
    assert a.area_m2 == pytest.approx(b.area_m2, rel=1e-12)
    assert a.bboxes == ((0.0, 0.0, 1.0, 1.0),)


def test_self_intersecting_polygon_is_repaired(tmp_path):
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [2, 2], [2, 0], [0, 2], [0, 0]]]}
    aoi = load_aoi(write_generated(tmp_path, "bowtie", bowtie))
    assert aoi.geometry.is_valid
    assert aoi.geometry.area == pytest.approx(2.0)  # two triangles of area 1
    assert len(aoi.parts) == 2


# ---- declared CRS ----------------------------------------------------------------------------------------


def test_utm_aoi_reprojects_onto_lonlat_aoi():
    utm = load_aoi(DEMO_AOIS / "camargue_utm31n.geojson")
    lonlat = load_aoi(DEMO_AOIS / "camargue.geojson")
    # The file's 4 corners are the lon/lat corners projected to UTM 31N (mm precision): each comes back
    # within 1e-6 degree.
    ring = np.asarray(utm.geometry.exterior.coords)
    for corner in np.asarray(lonlat.geometry.exterior.coords)[:4]:
        assert np.min(np.hypot(*(ring - corner).T)) < 1e-6
    # Between the corners the edges are straight in UTM, so they bow by up to ~0.4 m (4e-6 degree) from
    # the straight lon/lat edges: the AOI is densified before reprojection.
    assert shapely.hausdorff_distance(utm.geometry, lonlat.geometry) < 1e-5
    assert len(ring) > 5
    assert utm.area_m2 == pytest.approx(lonlat.area_m2, rel=1e-4)


def test_crs_as_plain_string(tmp_path):
    doc = json.loads((DEMO_AOIS / "camargue_utm31n.geojson").read_text())
    doc["crs"] = "EPSG:32631"
    aoi = load_aoi(write_generated(tmp_path, "crs_string", doc))
    reference = load_aoi(DEMO_AOIS / "camargue_utm31n.geojson")
    assert shapely.equals_exact(aoi.geometry, reference.geometry, tolerance=1e-12)


def test_crs84_and_epsg4326_names_leave_coordinates_as_lon_lat(tmp_path):
    for name in ("urn:ogc:def:crs:OGC:1.3:CRS84", "urn:ogc:def:crs:EPSG::4326"):
        doc = {**polygon(10, 50, 11, 51), "crs": {"type": "name", "properties": {"name": name}}}
        assert load_aoi(write_generated(tmp_path, "crs84", doc)).bboxes == ((10.0, 50.0, 11.0, 51.0),)


# ---- antimeridian ----------------------------------------------------------------------------------------


def test_fiji_is_split_at_antimeridian_not_world_wide():
    aoi = load_aoi(DEMO_AOIS / "fiji_antimeridian.geojson")
    assert len(aoi.parts) == 2
    assert sorted(aoi.bboxes) == [(-180.0, -17.5, -179.5, -16.0), (178.5, -17.5, 180.0, -16.0)]
    assert sum(b[2] - b[0] for b in aoi.bboxes) < 5
    # Same area as the same 2-degree box away from the antimeridian (independent: rotational symmetry).
    assert aoi.area_m2 == pytest.approx(
        abs(GEOD.geometry_area_perimeter(shapely.segmentize(box(-1.0, -17.5, 1.0, -16.0), 0.05))[0]), rel=1e-9
    )
    assert not aoi.geometry.contains(shapely.Point(0, -17))


def test_fix_antimeridian_leaves_ordinary_polygons_alone():
    ordinary = box(10, 10, 20, 20)
    assert fix_antimeridian(ordinary) is ordinary


# ---- untrusted files -------------------------------------------------------------------------------------


BAD_DOCS = {
    "malformed_json": ('{"type": "Feature", "geometry": ', "not valid JSON"),
    "empty_feature_collection": ({"type": "FeatureCollection", "features": []}, "has no features"),
    "point": ({"type": "Point", "coordinates": [4.5, 43.6]}, "is a Point, not an area"),
    "line_feature": (
        {
            "type": "Feature",
            "properties": {},
            "geometry": {"type": "LineString", "coordinates": [[0, 0], [1, 1]]},
        },
        "is a LineString, not an area",
    ),
    "null_geometry": ({"type": "Feature", "properties": {}, "geometry": None}, "has no geometry"),
    "json_list": ([1, 2, 3], "not GeoJSON"),
    "no_type": ({"features": []}, "not GeoJSON"),
    "unknown_type": ({"type": "Topology"}, "'Topology' is not a Feature"),
    "empty_polygon": ({"type": "Polygon", "coordinates": []}, "empty Polygon"),
    "malformed_coordinates": ({"type": "Polygon", "coordinates": [[[0, 0], [1]]]}, "malformed Polygon"),
    "lon_out_of_range": (polygon(170, 0, 200, 10), "out of longitude/latitude range"),
    "utm_without_crs": (
        {
            "type": "Polygon",
            "coordinates": [[[620299, 4826304], [625143, 4826393], [625081, 4829725], [620299, 4826304]]],
        },
        "out of longitude/latitude range",
    ),
    "nan": ('{"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [NaN, 1], [0, 0]]]}', "non-finite"),
    "unknown_crs": (
        {**polygon(0, 0, 1, 1), "crs": {"type": "name", "properties": {"name": "EPSG:99999999"}}},
        "unknown CRS",
    ),
    "zero_area": ({"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [2, 2], [0, 0]]]}, "no area"),
}


@pytest.mark.parametrize("name", sorted(BAD_DOCS))
def test_bad_file_is_one_line_aoi_error_naming_the_file(tmp_path, name):
    doc, expected = BAD_DOCS[name]
    path = write_generated(tmp_path, name, doc)
    with pytest.raises(AOIError) as info:
        load_aoi(path)
    message = str(info.value)
    assert message.startswith(f"--aoi {path}: ")
    assert expected in message
    assert "\n" not in message
    assert info.value.exit_code == 2


def test_missing_file(tmp_path):
    path = tmp_path / "nope.geojson"
    with pytest.raises(
        AOIError, match=rf"^--aoi {path}: cannot read it \(No such file or directory\); check the path$"
    ):
        load_aoi(path)


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(AOIError, match="a directory, not a regular file"):
        load_aoi(tmp_path)


def test_file_over_50_mb_is_refused_without_reading(tmp_path):
    path = tmp_path / "generated_huge.geojson"
    with path.open("wb") as f:
        f.truncate(MAX_AOI_BYTES + 1)  # sparse: nothing is written
    with pytest.raises(AOIError, match=r"more than the 50 MB allowed; simplify the geometry"):
        load_aoi(path)


# ---- coverage ------------------------------------------------------------------------------------------


def test_coverage_full_and_none():
    aoi = AOI(geometry=box(0, 0, 1, 1), parts=(box(0, 0, 1, 1),), source=Path("generated"))
    assert aoi.coverage(box(-1, -1, 2, 2)) == pytest.approx(1.0, abs=1e-12)
    assert aoi.coverage(box(5, 5, 6, 6)) == 0.0
    assert aoi.coverage(box(1, 0, 2, 1)) == 0.0  # touching edge: no area


@pytest.mark.parametrize(
    ("aoi_box", "footprint_box"),
    [((11, 0, 13, 2), (10, 0, 12, 2)), ((4.0, 60.0, 6.0, 61.0), (3.0, 60.5, 5.0, 62.0))],
)
def test_partial_coverage_matches_equal_area_projection(aoi_box, footprint_box):
    geom = box(*aoi_box)
    aoi = AOI(geometry=geom, parts=(geom,), source=Path("generated"))
    expected = equal_area_share(geom, box(*footprint_box))
    assert 0.2 < expected < 0.8
    assert aoi.coverage(box(*footprint_box)) == pytest.approx(expected, rel=1e-4)


def test_half_overlap_at_the_equator_is_one_half():
    geom = box(11, -1, 13, 1)
    aoi = AOI(geometry=geom, parts=(geom,), source=Path("generated"))
    # A lon/lat box's ellipsoidal area is proportional to its longitude span.
    assert aoi.coverage(box(10, -1, 12, 1)) == pytest.approx(0.5, rel=1e-6)


def test_geodesic_area_of_a_known_box():
    # 1 x 1 degree at the equator on WGS84: 12,308.778 km^2 (authalic formula), independent of pyproj.
    a, f = 6378137.0, 1 / 298.257223563
    e = np.sqrt(f * (2 - f))

    def q(phi):
        s = np.sin(phi)
        return (1 - e**2) * (s / (1 - e**2 * s**2) - np.log((1 - e * s) / (1 + e * s)) / (2 * e))

    expected = a**2 / 2 * np.radians(1) * (q(np.radians(1)) - q(0))
    assert geodesic_area(box(0, 0, 1, 1)) == pytest.approx(expected, rel=1e-6)


_COMB = """
import json, math, sys
from pathlib import Path
from fusarbatch.catalog.aoi import MAX_QUERY_VERTICES, load_aoi, query_geometry
teeth, w = 20_000, 40.0 / 20_000
coords = [[0.0, 80.0]]
for i in range(teeth):
    coords += [[i * w, -80.0], [i * w + w / 2, -80.0], [i * w + w / 2, 79.0], [(i + 1) * w, 79.0]]
coords += [[40.0, 80.0], [0.0, 80.0]]
path = Path(sys.argv[1])
path.write_text(json.dumps({"type": "Polygon", "coordinates": [coords]}))
aoi = load_aoi(path)
query = query_geometry(aoi)
print(json.dumps({"area": aoi.area_m2, "vertices": len(coords), "query_vertices": int(
    __import__("shapely").get_num_coordinates(query)), "covers": bool(query.covers(aoi.geometry))}))
"""


def _lonlat_box_area(west: float, south: float, east: float, north: float) -> float:
    """Exact area (m^2) on the WGS84 ellipsoid of a box bounded by meridians and parallels: the zone
    between two latitudes (authalic formula), times the share of longitude."""
    a, f = 6378137.0, 1 / 298.257223563
    b, e = a * (1 - f), math.sqrt(f * (2 - f))

    def zone(lat: float) -> float:
        s = math.sin(math.radians(lat))
        return s / (2 * (1 - e * e * s * s)) + math.log((1 + e * s) / (1 - e * s)) / (4 * e)

    return math.radians(east - west) * b * b * (zone(north) - zone(south))


def test_pathological_aoi_is_measured_and_searched_with_bounded_work(tmp_path):
    """A valid AOI of 80,003 vertices over 160 degrees of latitude (a comb of 20,000 teeth): cutting every
    edge into 0.05 degree pieces was 127 million points (1.9 GB at once, minutes). Run in a process limited
    to 3 GB of address space, with a deadline: the area is right within 0.1 % of the exact one, and the
    geometry sent to a STAC API is a superset of at most MAX_QUERY_VERTICES vertices."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))

    proc = subprocess.run(
        [sys.executable, "-c", _COMB, str(tmp_path / "generated_comb.geojson")],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    w = 40.0 / 20_000
    exact = 20_000 * _lonlat_box_area(0, -80, w / 2, 79) + _lonlat_box_area(0, 79, 40, 80)
    assert got["vertices"] == 80_003
    assert got["area"] == pytest.approx(exact, rel=1e-3)
    assert got["query_vertices"] <= 1000 and got["covers"]
