"""One SAR acquisition as the pipeline sees it: :class:`Scene`, built from a STAC Item (DESIGN 3.1).

A scene knows its item id, acquisition time (UTC), footprint (EPSG:4326), where each polarisation's pixels
are (:class:`BandRef`), its CRS (``None`` for GCP-only rasters), platform and orbit direction, and how its
values are scaled. Scenes are saved as stac-geoparquet (``scenes.parquet``) so that a run is reproducible.

fusarbatch reads two optional, namespaced Item or Asset properties that override the catalog's defaults:
``fusarbatch:scale`` (``db``/``power``/``amplitude``/``dn``) and ``fusarbatch:quantity``
(``sigma0``/``gamma0``/``beta0``/``dn``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import shapely
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

from fusarbatch.catalog.spec import CatalogSpec
from fusarbatch.errors import CatalogError, UsageError

#: Order in which polarisations are stored (``pol`` axis of the tile store).
POL_ORDER: tuple[str, ...] = ("VV", "VH", "HH", "HV")
_DB_UNITS = {"db", "decibel", "decibels"}
_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]")
_RESERVED = {"zarr.json", "c", "scenes.parquet"}
#: Asset key of a polarisation's calibration annotation (Earth Search, Planetary Computer, stactools).
CALIBRATION_ASSET = "schema-calibration-{pol}"


@dataclass(frozen=True)
class BandRef:
    """Where one polarisation's pixels are: an asset href and a 1-based band index in it."""

    href: str
    """Absolute href: a local path, ``file://``, ``http(s)://`` or ``s3://`` URL (signed if needed)."""
    band: int = 1
    """1-based band index within the asset (GDAL convention)."""
    nodata: float | None = None
    """Nodata declared by the catalog (``raster:bands``); the raster's own nodata is used as well."""


@dataclass(frozen=True)
class Scene:
    """One acquisition with its polarisations; built by :meth:`from_item`."""

    item_id: str
    """STAC Item id."""
    datetime: dt.datetime
    """Acquisition time, timezone-aware UTC (the start of the range when the item has only a range)."""
    footprint: BaseGeometry
    """Item geometry, EPSG:4326 (lon, lat)."""
    bands: dict[str, BandRef]
    """Polarisation (``VV``, ``VH``, ``HH``, ``HV``) -> pixels, in :data:`POL_ORDER`."""
    quantity: str = "sigma0"
    """Backscatter quantity: ``sigma0`` (GRD), ``gamma0`` (RTC), ``beta0``, or ``dn`` (uncalibrated)."""
    scale: str = ""
    """How values are scaled in the assets: ``db``, ``power``, ``amplitude`` or ``dn``; empty when neither
    the catalog nor the item says (the tiler then decides from the data, see
    :func:`fusarbatch.tiling.scaling.detect_scale`)."""
    crs: str | None = None
    """The assets' CRS as ``EPSG:n`` or WKT2 (``proj:code``/``proj:wkt2``); ``None`` when unknown or
    GCP-only (the tiler then reads the raster itself)."""
    collection: str | None = None
    platform: str | None = None
    """Lower case, e.g. ``sentinel-1a``."""
    orbit_direction: str | None = None
    """``ascending`` or ``descending`` (``sat:orbit_state``), when the item says."""
    product_type: str | None = None
    calibration: dict[str, str] = field(default_factory=dict)
    """Polarisation -> href of its radiometric calibration annotation (the ``schema-calibration-<pol>``
    asset of a Sentinel-1 GRD item), used to calibrate digital numbers
    (:mod:`fusarbatch.tiling.calibration`)."""
    item: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """The STAC Item as a dict, with absolute asset hrefs."""

    @property
    def pols(self) -> tuple[str, ...]:
        """Polarisations in storage order, e.g. ``("VV", "VH")``."""
        return tuple(self.bands)

    @property
    def safe_id(self) -> str:
        """:attr:`item_id` as a file and Zarr group name (item ids come from untrusted catalogs).

        Characters outside ``[A-Za-z0-9._-]`` become ``_`` and leading dots and underscores go (pyarrow's
        and geopandas' dataset readers skip files whose names start with ``.`` or ``_``, so
        ``geopandas.read_parquet("out/detections")`` would drop the scene). When that changed the id,
        or the result is empty, longer than 120 characters, or a name the Zarr store reserves
        (``zarr.json``, ``c``), the first 8 hex digits of the id's SHA-1 are appended, so that different
        ids never share a name.
        """
        cleaned = _SAFE_ID.sub("_", self.item_id).lstrip("._")
        reserved = cleaned.lower() in _RESERVED or cleaned.lower().startswith("zarr.")
        if cleaned == self.item_id and cleaned and len(cleaned) <= 120 and not reserved:
            return cleaned
        digest = hashlib.sha1(self.item_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        return f"{cleaned[:120] or 'scene'}-{digest}"

    @classmethod
    def from_item(cls, item: dict[str, Any], spec: CatalogSpec) -> Scene:
        """Build a scene from a STAC Item dict whose asset hrefs are already absolute.

        Polarisations are found per ``spec.assets`` (pol -> asset keys, first present wins, band 1), then in
        any data asset that holds several polarisations (band i+1 holds the i-th). An asset's
        polarisations are its ``sar:polarizations``, else its bands' (``bands`` / ``raster:bands`` /
        ``eo:bands`` entries with one ``sar:polarizations`` each, or named ``VV``, ``VH``, ...), else, for
        the item's only data asset, the item's ``sar:polarizations`` (when the asset does not list fewer
        bands; not for an asset found by key). An asset found under one polarisation's key that lists
        several gives all of them.
        Calibration annotations (``schema-calibration-<pol>`` assets, Sentinel-1 GRD) are kept per
        polarisation in :attr:`calibration`. Local hrefs are URI references: ``%20`` and the like are
        decoded (a path that exists only as written is kept as written).

        :raises CatalogError: the item has no datetime or no asset for any polarisation.
        """
        props = item.get("properties") or {}
        item_id = str(item.get("id", ""))
        when = props.get("datetime") or props.get("start_datetime")
        if not when:
            raise CatalogError(f"item {item_id!r}: no datetime or start_datetime; fix the catalog")
        acquired = _parse_datetime(when)
        geometry = item.get("geometry")
        if geometry:
            footprint = shape(geometry)
        elif item.get("bbox"):
            footprint = shapely.box(
                *item["bbox"][:2], *item["bbox"][-3:-1] if len(item["bbox"]) == 6 else item["bbox"][2:4]
            )
        else:
            raise CatalogError(f"item {item_id!r}: no geometry or bbox; fix the catalog")
        assets: dict[str, dict[str, Any]] = item.get("assets") or {}
        signer = spec.signer()
        data_assets = [a for a in assets.values() if isinstance(a, dict) and _is_data(a)]
        bands: dict[str, BandRef] = {}
        scales: list[str] = []
        quantities: list[str] = []

        def take(asset: dict[str, Any], pols: Sequence[str]) -> None:
            """Every polarisation ``pols`` lists (band i+1 holds the i-th) not found yet."""
            href = _sign(_local_href(asset["href"]), signer)
            for i, pol in enumerate(pols):
                if pol not in bands:
                    bands[pol] = BandRef(href, i + 1, _nodata(asset, i))
            scales.append(_asset_scale(asset, props))
            quantities.append(asset.get("fusarbatch:quantity", ""))

        for pol in POL_ORDER:
            for key in spec.assets.get(pol, ()):
                if key in assets and isinstance(assets[key], dict) and assets[key].get("href"):
                    asset = assets[key]
                    pols = _asset_pols(asset, props, sole=False)
                    # a multi-band asset under a polarisation's key holds the others too (VV and VH in one
                    # file): each from its own band, not band 1 for the key's polarisation alone
                    take(asset, pols if pol in pols else [pol])
                    break
        if not bands:
            for asset in assets.values():
                if not (isinstance(asset, dict) and asset.get("href") and _is_data(asset)):
                    continue
                pols = _asset_pols(asset, props, sole=data_assets == [asset])
                if len(pols) > 1:
                    take(asset, pols)
                    break
        if not bands:
            raise CatalogError(
                f"item {item_id!r}: no asset for any polarisation (looked for keys "
                f"{sorted({k for keys in spec.assets.values() for k in keys})}); set `assets` in the catalog"
            )
        bands = {pol: bands[pol] for pol in POL_ORDER if pol in bands} | {
            pol: ref for pol, ref in bands.items() if pol not in POL_ORDER
        }
        product_type = props.get("sar:product_type")
        quantity = (
            next((q for q in quantities if q), "")
            or props.get("fusarbatch:quantity")
            or ("gamma0" if str(product_type).upper() == "RTC" else spec.quantity)
        )
        scale = next((s for s in scales if s), "") or spec.scale
        calibration = {
            pol: _sign(_local_href(assets[key]["href"]), signer)
            for pol in bands
            if isinstance(assets.get(key := CALIBRATION_ASSET.format(pol=pol.lower())), dict)
            and assets[key].get("href")
        }
        crs = None
        if props.get("proj:code"):
            crs = str(props["proj:code"])
        elif props.get("proj:epsg"):
            crs = f"EPSG:{int(props['proj:epsg'])}"
        elif props.get("proj:wkt2"):
            crs = str(props["proj:wkt2"])
        return cls(
            item_id=item_id,
            datetime=acquired,
            footprint=footprint,
            bands=bands,
            quantity=quantity,
            scale=scale,
            crs=crs,
            calibration=calibration,
            collection=item.get("collection"),
            platform=_lower(props.get("platform")),
            orbit_direction=_lower(props.get("sat:orbit_state")),
            product_type=product_type,
            item=item,
        )


def _parse_datetime(value: str) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.astimezone(dt.UTC)


def _lower(value: Any) -> str | None:
    """STAC asks for lower-case platform and orbit names; some catalogs write ``SENTINEL-1A``."""
    return (str(value).strip().lower() or None) if value else None


def _sign(href: str, signer: Any) -> str:
    return signer(href) if signer is not None else href


def _local_href(href: str) -> str:
    """A local href (no scheme, or ``file://``) as a file path: STAC hrefs are URI references, so
    ``../sar%20data/x.tif`` names ``../sar data/x.tif``. A path that exists only as written (a catalog that
    did not encode a literal ``%``) is kept as written. Other hrefs are returned unchanged."""
    parsed = urlparse(href)
    if parsed.scheme == "file":
        path = unquote(parsed.path)
    elif parsed.scheme and not (len(parsed.scheme) == 1 and href[1:2] == ":"):  # C:\ is a path
        return href
    else:
        path = href
        decoded = unquote(href)
        if decoded != href and (os.path.exists(decoded) or not os.path.exists(href)):
            path = decoded
    return path


def _is_data(asset: dict[str, Any]) -> bool:
    return "data" in (asset.get("roles") or ["data"])


def _band_entries(asset: dict[str, Any]) -> list[Any]:
    for key in ("bands", "raster:bands", "eo:bands"):
        entries = asset.get(key)
        if isinstance(entries, list) and entries:
            return entries
    return []


def _asset_pols(asset: dict[str, Any], props: dict[str, Any], *, sole: bool) -> list[str]:
    """Polarisations of an asset's bands, in band order (see :meth:`Scene.from_item`); [] when unknown."""
    listed = asset.get("sar:polarizations")
    if isinstance(listed, list) and listed:
        return [str(p).upper() for p in listed]
    entries = _band_entries(asset)
    per_band = []
    for entry in entries:
        if not isinstance(entry, dict):
            break
        own = entry.get("sar:polarizations")
        name = str(entry.get("name") or "").upper()
        if isinstance(own, list) and len(own) == 1:
            per_band.append(str(own[0]).upper())
        elif name in POL_ORDER:
            per_band.append(name)
        else:
            break
    if entries and len(per_band) == len(entries):
        return per_band
    item_pols = props.get("sar:polarizations")
    if sole and isinstance(item_pols, list) and len(item_pols) > 1 and len(entries) in (0, len(item_pols)):
        return [str(p).upper() for p in item_pols]
    return []


def _nodata(asset: dict[str, Any], index: int) -> float | None:
    bands = asset.get("raster:bands") or asset.get("bands") or []
    if index < len(bands) and isinstance(bands[index], dict):
        value = bands[index].get("nodata", bands[index].get("raster:nodata"))
        if isinstance(value, int | float):
            return float(value)
        if value == "nan":
            return float("nan")
    return None


def _asset_scale(asset: dict[str, Any], props: dict[str, Any]) -> str:
    explicit = asset.get("fusarbatch:scale") or props.get("fusarbatch:scale")
    if explicit:
        return str(explicit)
    for band in asset.get("raster:bands") or asset.get("bands") or []:
        unit = str(band.get("unit", band.get("raster:unit", ""))).lower() if isinstance(band, dict) else ""
        if unit in _DB_UNITS:
            return "db"
    return ""


def save_scenes(scenes: Sequence[Scene], path: str | Path) -> Path:
    """Write scenes as stac-geoparquet (one row per Item), atomically (temporary name, then rename).

    :returns: the path written.
    """
    import stac_geoparquet.arrow as sga

    path = Path(path)
    if path.is_dir():
        raise UsageError(f"--save {path}: is a directory; give a file name such as scenes.parquet")
    if path.suffix.lower() not in (".parquet", ".geoparquet"):
        raise UsageError(f"--save {path}: stac-geoparquet is written: give a .parquet file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UsageError(f"--save {path}: cannot write there ({exc.strerror}); choose another path") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
    try:
        if scenes:
            table = sga.parse_stac_items_to_arrow([s.item for s in scenes])
            sga.to_parquet(table, tmp)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"id": pa.array([], pa.string())}), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_items_parquet(path: str | Path) -> list[dict[str, Any]]:
    """Read STAC Item dicts back from a stac-geoparquet file written by :func:`save_scenes` or any
    stac-geoparquet writer.

    :raises CatalogError: the file is not readable stac-geoparquet.
    """
    import pyarrow.parquet as pq
    import stac_geoparquet.arrow as sga

    try:
        table = pq.read_table(path)
        if table.num_rows == 0:
            return []
        return list(sga.stac_table_to_items(table))
    except Exception as exc:  # pyarrow and stac-geoparquet raise many types for a bad file
        raise CatalogError(
            f"{path}: not a readable stac-geoparquet file ({exc}); write it with --save"
        ) from None


def scenes_from_items(items: Iterable[dict[str, Any]], spec: CatalogSpec) -> list[Scene]:
    """:meth:`Scene.from_item` over many items, sorted by (datetime, item id)."""
    return sorted((Scene.from_item(i, spec) for i in items), key=lambda s: (s.datetime, s.item_id))
