"""The area of interest: a GeoJSON file -> :class:`AOI` in EPSG:4326, split at the antimeridian (DESIGN 3.1).

The file is untrusted input. Whatever is wrong with it (missing, too big, not JSON, not GeoJSON, no
features, a point or line instead of an area, coordinates out of range) is raised as one
:class:`~fusarbatch.errors.AOIError` line that names the file and the fix.

Accepted: a Feature, a FeatureCollection (the union of all its features), or a bare Polygon,
MultiPolygon or GeometryCollection of those. A CRS declared with the GeoJSON-2008 ``crs`` member
(``{"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32631"}}`` or ``"EPSG:32631"``) is
honoured: the geometry is densified and reprojected to EPSG:4326 (x = longitude, y = latitude, whatever
the CRS's axis order). Without a ``crs`` member coordinates are longitude/latitude (RFC 7946).

An AOI that crosses the antimeridian (consecutive vertices more than 180 degrees of longitude apart,
e.g. 178.5 -> -179.5) is split into parts at +-180 degrees with the ``antimeridian`` package, never
turned into a world-wide box.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import antimeridian
import numpy as np
import shapely
from pyproj import CRS, Geod, Transformer
from pyproj.exceptions import CRSError
from shapely.geometry import MultiPolygon, Polygon, shape
from shapely.geometry.base import BaseGeometry

from fusarbatch.errors import AOIError
from fusarbatch.files import read_capped

log = logging.getLogger("fusarbatch.catalog")

#: Largest AOI file read, bytes.
MAX_AOI_BYTES = 50 * 1024 * 1024
#: The ellipsoid used for areas (coverage shares).
GEOD = Geod(ellps="WGS84")
#: Longest edge, degrees, taken as a geodesic when measuring areas: a 0.05 degree geodesic strays about
#: 0.3 m from the straight longitude/latitude line at 60 degrees latitude (less nearer the equator).
AREA_SEGMENT_DEG = 0.05
#: Most points an area measurement or a reprojection cuts an AOI's edges into: beyond it, the pieces get
#: longer than :data:`AREA_SEGMENT_DEG` (a valid AOI of tens of thousands of vertices over 160 degrees of
#: latitude would otherwise become 10^8 points: gigabytes and minutes).
MAX_DENSIFY_POINTS = 200_000
#: Most vertices of the geometry sent to a STAC API as ``intersects``; a larger AOI is sent as a simpler
#: superset (:func:`query_geometry`), the exact AOI still filters the answer.
MAX_QUERY_VERTICES = 1_000
_AREAL = {"Polygon", "MultiPolygon"}
_GEOJSON_GEOMETRIES = {
    "Point",
    "MultiPoint",
    "LineString",
    "MultiLineString",
    "Polygon",
    "MultiPolygon",
    "GeometryCollection",
}
_WGS84 = CRS.from_user_input("OGC:CRS84")
#: Source-CRS edges are cut into this many pieces of the geometry's extent before reprojection, so a
#: straight edge in a projected CRS stays (nearly) where it was once in longitude/latitude.
_DENSIFY_STEPS = 100


@dataclass(frozen=True)
class AOI:
    """An area of interest in EPSG:4326 (x = longitude, y = latitude, degrees)."""

    geometry: Polygon | MultiPolygon
    """The whole AOI; a MultiPolygon when it has several parts (or was split at the antimeridian)."""
    parts: tuple[Polygon, ...]
    """The polygons of :attr:`geometry`; none crosses the antimeridian (longitudes in [-180, 180])."""
    source: Path
    """The file it was read from."""

    @property
    def bboxes(self) -> tuple[tuple[float, float, float, float], ...]:
        """``(min_lon, min_lat, max_lon, max_lat)`` per part, degrees; a part never spans +-180."""
        return tuple(tuple(float(v) for v in part.bounds) for part in self.parts)  # type: ignore[misc]

    @cached_property
    def area_m2(self) -> float:
        """Geodesic area on the WGS84 ellipsoid, square metres."""
        return geodesic_area(self.geometry)

    def coverage(self, footprint: BaseGeometry) -> float:
        """Share of this AOI's geodesic area that ``footprint`` (EPSG:4326) covers, in [0, 1]."""
        if self.area_m2 <= 0:
            return 0.0
        try:
            overlap = shapely.intersection(self.geometry, footprint)
        except shapely.errors.GEOSException:
            overlap = shapely.intersection(self.geometry, shapely.make_valid(footprint))
        return min(1.0, max(0.0, geodesic_area(overlap) / self.area_m2))


def geodesic_area(geometry: BaseGeometry) -> float:
    """Area of a (multi)polygon in EPSG:4326 on the WGS84 ellipsoid, square metres (>= 0).

    Edges are straight in longitude/latitude (RFC 7946): they are cut into pieces of at most
    :data:`AREA_SEGMENT_DEG` degrees, each taken as a geodesic (``pyproj.Geod.geometry_area_perimeter``).
    The work is bounded: when that would give more than :data:`MAX_DENSIFY_POINTS` points, the pieces
    are ``perimeter / MAX_DENSIFY_POINTS`` degrees long instead (meridian edges are geodesics whatever the
    piece length; only long edges along parallels lose accuracy). Non-areal parts count zero.
    """
    if geometry.is_empty:
        return 0.0
    parts = _polygons(geometry)
    step = _densify_step(parts, AREA_SEGMENT_DEG)
    total = 0.0
    for part in parts:
        area, _ = GEOD.geometry_area_perimeter(shapely.segmentize(part, step))
        total += abs(area)
    return total


def _densify_step(parts: list[Polygon], step: float) -> float:
    """``step``, or longer, so that cutting the edges of ``parts`` gives at most :data:`MAX_DENSIFY_POINTS`
    points (edge lengths in the geometry's own units)."""
    length = float(sum(shapely.length(p) for p in parts))
    return max(step, length / MAX_DENSIFY_POINTS)


def query_geometry(aoi: AOI) -> Polygon | MultiPolygon:
    """The geometry to send to a STAC API for ``aoi``: the AOI itself when it has at most
    :data:`MAX_QUERY_VERTICES` vertices; else a superset with fewer: the convex hull of each part, or
    when that is still too many, the bounding box of each part, or of all parts east and all parts west
    of the antimeridian split (never one box across +-180). Items are then filtered against the exact AOI.
    """
    if shapely.get_num_coordinates(aoi.geometry) <= MAX_QUERY_VERTICES:
        return aoi.geometry
    for simpler in (shapely.convex_hull, shapely.envelope):
        parts = [simpler(p) for p in aoi.parts]
        if sum(shapely.get_num_coordinates(p) for p in parts) <= MAX_QUERY_VERTICES:
            return shapely.union_all(parts)
    sides = [[p for p in aoi.parts if p.centroid.x >= 0], [p for p in aoi.parts if p.centroid.x < 0]]
    boxes = [shapely.box(*shapely.total_bounds(side)) for side in sides if side]
    return boxes[0] if len(boxes) == 1 else MultiPolygon(boxes)


def load_aoi(path: Path) -> AOI:
    """Read an AOI GeoJSON file (see the module docstring for what is accepted).

    :param path: a GeoJSON file, at most 50 MB.
    :returns: the AOI in EPSG:4326, split at the antimeridian when it crosses it, repaired with
        ``shapely.make_valid`` when it is self-intersecting.
    :raises AOIError: the file is missing, too big, not JSON, not GeoJSON, has no features or an empty
        geometry, holds a point or line geometry, declares an unknown CRS, or has coordinates that are not
        finite or out of the longitude/latitude range after reprojection.
    """
    path = Path(path)
    doc = _read_json(path)
    crs = _declared_crs(path, doc)
    geometries = _areal_geometries(path, doc)
    if crs is not None:
        geometries = [_to_wgs84(path, g, crs) for g in geometries]
    polygons: list[Polygon] = []
    for geometry in geometries:
        _check_lonlat(path, geometry)
        for polygon in _polygons(fix_antimeridian(geometry)):
            polygons.extend(_polygons(_valid(path, polygon)))
    merged = shapely.union_all([p for p in polygons if not p.is_empty]) if polygons else Polygon()
    parts = tuple(p for p in _polygons(merged) if p.area > 0)
    if not parts:
        raise AOIError(f"--aoi {path}: the geometry is empty or has no area; draw a polygon around the area")
    geometry: Polygon | MultiPolygon = parts[0] if len(parts) == 1 else MultiPolygon(parts)
    return AOI(geometry=geometry, parts=parts, source=path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise AOIError(f"--aoi {path}: cannot read it ({exc.strerror or exc}); check the path") from None
    if path.is_file() and size > MAX_AOI_BYTES:
        raise AOIError(
            f"--aoi {path}: the file is {size / 2**20:.0f} MB, more than the {MAX_AOI_BYTES // 2**20} MB "
            f"allowed; simplify the geometry"
        )
    try:
        # a FIFO or device (not a file) is refused before it is opened; the read stops at the cap
        text = read_capped(path, "--aoi", AOIError, MAX_AOI_BYTES, "give a GeoJSON file").decode("utf-8-sig")
    except OSError as exc:
        raise AOIError(f"--aoi {path}: cannot read it ({exc.strerror or exc}); check the path") from None
    except UnicodeDecodeError:
        raise AOIError(f"--aoi {path}: not UTF-8 text; give a GeoJSON file") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AOIError(
            f"--aoi {path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
            f"give a GeoJSON file"
        ) from None
    except RecursionError:
        raise AOIError(f"--aoi {path}: JSON nested too deeply; give a GeoJSON file") from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise AOIError(f"--aoi {path}: unreadable JSON ({exc}); give a GeoJSON file") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("type"), str):
        raise AOIError(
            f'--aoi {path}: not GeoJSON (no "type" member at the top); give a Feature, FeatureCollection '
            f"or Polygon"
        )
    return doc


def _declared_crs(path: Path, doc: dict[str, Any]) -> CRS | None:
    """The GeoJSON-2008 ``crs`` member as a pyproj CRS; ``None`` when absent or WGS84 longitude/latitude."""
    member = doc.get("crs")
    if member is None:
        return None
    name: Any = None
    if isinstance(member, str):
        name = member
    elif isinstance(member, dict):
        props = member.get("properties") or {}
        kind = str(member.get("type", "")).lower()
        if kind == "name" and isinstance(props, dict):
            name = props.get("name")
        elif kind == "epsg" and isinstance(props, dict) and props.get("code") is not None:
            name = f"EPSG:{props['code']}"
        elif kind == "link":
            raise AOIError(
                f"--aoi {path}: a linked CRS is not supported; declare it by name "
                f'("crs": {{"type": "name", "properties": {{"name": "EPSG:32631"}}}}) or reproject to '
                f"EPSG:4326"
            )
    if not isinstance(name, str) or not name.strip():
        raise AOIError(
            f'--aoi {path}: unreadable "crs" member; use '
            f'{{"type": "name", "properties": {{"name": "EPSG:<code>"}}}} or remove it for EPSG:4326'
        )
    try:
        crs = CRS.from_user_input(name.strip())
    except CRSError:
        raise AOIError(f"--aoi {path}: unknown CRS {name!r}; use an EPSG code such as 'EPSG:32631'") from None
    if crs.equals(_WGS84, ignore_axis_order=True) or crs.to_epsg() == 4326:
        return None
    return crs


def _areal_geometries(path: Path, doc: dict[str, Any]) -> list[BaseGeometry]:
    kind = doc["type"]
    if kind == "FeatureCollection":
        features = doc.get("features")
        if not isinstance(features, list):
            raise AOIError(f'--aoi {path}: FeatureCollection without a "features" list; fix the file')
        if not features:
            raise AOIError(f"--aoi {path}: the FeatureCollection has no features; add a polygon feature")
        raw = [_feature_geometry(path, f, f"feature {i}") for i, f in enumerate(features)]
    elif kind == "Feature":
        raw = [_feature_geometry(path, doc, "the feature")]
    elif kind in _GEOJSON_GEOMETRIES:
        raw = [(doc, "the geometry")]
    else:
        raise AOIError(
            f"--aoi {path}: GeoJSON type {kind!r} is not a Feature, FeatureCollection or geometry; "
            f"fix the file"
        )
    geometries: list[BaseGeometry] = []
    for geom, where in raw:
        geometries.extend(_flatten(path, geom, where))
    if not geometries:
        raise AOIError(f"--aoi {path}: no geometry in the file; add a polygon")
    return geometries


def _feature_geometry(path: Path, feature: Any, where: str) -> tuple[Any, str]:
    if not isinstance(feature, dict) or feature.get("type") != "Feature":
        raise AOIError(f"--aoi {path}: {where} is not a GeoJSON Feature; fix the file")
    geometry = feature.get("geometry")
    if geometry is None:
        raise AOIError(f"--aoi {path}: {where} has no geometry (null); give it a polygon or remove it")
    return geometry, where


def _flatten(path: Path, geom: Any, where: str) -> list[BaseGeometry]:
    if not isinstance(geom, dict) or geom.get("type") not in _GEOJSON_GEOMETRIES:
        raise AOIError(f"--aoi {path}: {where} is not a GeoJSON geometry; fix the file")
    kind = geom["type"]
    if kind == "GeometryCollection":
        members = geom.get("geometries")
        if not isinstance(members, list):
            raise AOIError(f'--aoi {path}: {where} is a GeometryCollection without "geometries"; fix it')
        return [g for member in members for g in _flatten(path, member, where)]
    if kind not in _AREAL:
        raise AOIError(
            f"--aoi {path}: {where} is a {kind}, not an area; an AOI must be a Polygon or MultiPolygon "
            f"(buffer points or lines into a polygon first)"
        )
    try:
        with np.errstate(invalid="ignore"):  # NaN coordinates: reported below, not warned about
            shp = shape(geom)
        coords = shapely.get_coordinates(shp)
    except Exception as exc:  # shapely raises many types for malformed coordinate arrays
        raise AOIError(
            f"--aoi {path}: {where} has malformed {kind} coordinates ({type(exc).__name__}); fix the file"
        ) from None
    if shp.is_empty:
        raise AOIError(f"--aoi {path}: {where} is an empty {kind}; draw a polygon around the area")
    if not np.isfinite(coords).all():
        raise AOIError(f"--aoi {path}: {where} has non-finite coordinates (NaN or infinity); fix the file")
    return [shp]


def _to_wgs84(path: Path, geometry: BaseGeometry, crs: CRS) -> BaseGeometry:
    minx, miny, maxx, maxy = geometry.bounds
    step = _densify_step(_polygons(geometry), max(maxx - minx, maxy - miny) / _DENSIFY_STEPS)
    if step > 0:
        geometry = shapely.segmentize(geometry, step)
    transformer = Transformer.from_crs(crs, 4326, always_xy=True)

    def project(xy: np.ndarray) -> np.ndarray:
        lon, lat = transformer.transform(xy[:, 0], xy[:, 1], errcheck=False)
        return np.column_stack([lon, lat])

    out = shapely.transform(geometry, project)
    if not np.isfinite(shapely.get_coordinates(out)).all():
        raise AOIError(
            f"--aoi {path}: coordinates fall outside the area of {crs.name!r} and cannot be reprojected; "
            f"check the declared CRS"
        )
    return out


def _check_lonlat(path: Path, geometry: BaseGeometry) -> None:
    minx, miny, maxx, maxy = geometry.bounds
    eps = 1e-9
    if minx < -180 - eps or maxx > 180 + eps or miny < -90 - eps or maxy > 90 + eps:
        raise AOIError(
            f"--aoi {path}: coordinates out of longitude/latitude range (bounds {minx:.6g}, {miny:.6g}, "
            f'{maxx:.6g}, {maxy:.6g}); declare the file\'s CRS with a "crs" member or reproject to EPSG:4326'
        )


def _valid(path: Path, geometry: BaseGeometry) -> BaseGeometry:
    if geometry.is_valid:
        return geometry
    reason = shapely.is_valid_reason(geometry)
    repaired = shapely.make_valid(geometry)
    if not any(p.area > 0 for p in _polygons(repaired)):
        raise AOIError(f"--aoi {path}: invalid geometry ({reason}) with no area left; fix the polygon")
    log.warning("--aoi %s: invalid geometry (%s) repaired with make_valid", path, reason)
    return repaired


def fix_antimeridian(geometry: BaseGeometry) -> BaseGeometry:
    """Split the polygons of ``geometry`` (EPSG:4326) that cross the antimeridian at +-180 degrees.

    A polygon crosses when a ring has consecutive vertices more than 180 degrees of longitude apart
    (RFC 7946 3.1.9: such an edge is read the short way round, across +-180). Crossing polygons are cut with
    ``antimeridian.fix_polygon`` (crossing latitudes interpolated linearly in longitude/latitude); the rest,
    and non-polygonal geometries, are returned unchanged.

    :returns: ``geometry`` itself when nothing crosses; else a (Multi)Polygon with longitudes in [-180, 180].
    """
    polygons = _polygons(geometry)
    if not any(_crosses_antimeridian(p) for p in polygons):
        return geometry
    out: list[Polygon] = []
    for polygon in polygons:
        if _crosses_antimeridian(polygon):
            out.extend(_polygons(antimeridian.fix_polygon(polygon, fix_winding=True, great_circle=False)))
        else:
            out.append(polygon)
    return out[0] if len(out) == 1 else MultiPolygon(out)


def _crosses_antimeridian(polygon: Polygon) -> bool:
    """Whether a ring has consecutive vertices more than 180 degrees of longitude apart (RFC 7946 3.1.9:
    such an edge is read as crossing +-180, the short way round)."""
    for ring in (polygon.exterior, *polygon.interiors):
        lon = np.asarray(ring.coords)[:, 0]
        if lon.size > 1 and np.abs(np.diff(lon)).max() > 180:
            return True
    return False


def _polygons(geometry: BaseGeometry) -> list[Polygon]:
    if isinstance(geometry, Polygon):
        return [] if geometry.is_empty else [geometry]
    if hasattr(geometry, "geoms"):
        return [p for g in geometry.geoms for p in _polygons(g)]
    return []
