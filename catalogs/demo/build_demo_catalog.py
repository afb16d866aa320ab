"""Build the demo static STAC catalog from the real Sentinel-1 rasters in ``data/``.

Run from the repository root (``python catalogs/demo/build_demo_catalog.py [--copy-from ../shared/data]``).
``--copy-from`` first copies the rasters and their licences from the shared data folder; without it the
rasters already in ``catalogs/demo/data`` are used. The output (``catalog.json``, ``collection.json``,
``items/``) is committed; this script is how it was made.

Every pixel is real Sentinel-1 data (see ``data/*/SOURCE.txt`` and ``ATTRIBUTION.md``). Item metadata is
taken from the rasters, their file names and the SAFE manifest; nothing is invented except the SEN12MS
acquisition range (SEN12MS gives the season, spring 2017, not the day).
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
from pathlib import Path

import pystac
import rasterio
import shapely
from pyproj import Transformer
from rasterio.warp import transform_geom

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
UTC = dt.UTC

SOURCES = {
    "camargue": (
        "s1/pyrosar",
        ["S1A__IW___A_20150309T173017_VV_grd_mli_geo_norm_db.tif", "LICENSE.txt", "SOURCE.txt"],
    ),
    "sen12ms": ("s1/sen12ms", ["ROIs1158_spring_s1_1_p30.tif", "SOURCE.txt"]),
    "quicklook_gcps": ("s1/quicklook_gcps", ["S1A_IW_GRDH_20210119T031653_quicklook_gcps.tif", "SOURCE.txt"]),
}


def copy_rasters(shared: Path) -> None:
    for folder, (src, names) in SOURCES.items():
        (DATA / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy2(shared / src / name, DATA / folder / name)
    shutil.copy2(shared / "s1/pyrosar/LICENSE.txt", DATA / "quicklook_gcps/LICENSE.txt")


def footprint_of(path: Path) -> tuple[shapely.Polygon, dict]:
    """Footprint (EPSG:4326) and projection fields of a raster with a geotransform or GCPs."""
    with rasterio.open(path) as src:
        if src.crs is not None and not src.transform.is_identity:
            left, b, r, t = src.bounds
            ring = shapely.box(left, b, r, t).segmentize(max(src.res) * 64)
            geom = shapely.geometry.shape(
                transform_geom(src.crs, "EPSG:4326", shapely.geometry.mapping(ring))
            )
            proj = {
                "proj:code": f"EPSG:{src.crs.to_epsg()}",
                "proj:shape": [src.height, src.width],
                "proj:transform": list(src.transform)[:6],
                "proj:bbox": [left, b, r, t],
            }
            return geom, proj
        gcps, gcp_crs = src.gcps
        to_ll = Transformer.from_crs(gcp_crs, "EPSG:4326", always_xy=True)
        pts = [to_ll.transform(g.x, g.y) for g in gcps]
        # GCPs sample a regular (line, pixel) grid: its outer ring is the footprint.
        hull = shapely.MultiPoint(pts).convex_hull
        return hull, {"proj:code": None, "proj:shape": [src.height, src.width]}


def sar_fields(pols: list[str], orbit: str | None, platform: str) -> dict:
    fields = {
        "platform": platform,
        "constellation": "sentinel-1",
        "instruments": ["c-sar"],
        "sar:instrument_mode": "IW",
        "sar:frequency_band": "C",
        "sar:center_frequency": 5.405,
        "sar:polarizations": pols,
        "sar:product_type": "GRD",
    }
    if orbit:
        fields["sat:orbit_state"] = orbit
    return fields


def make_item(
    item_id: str, raster: Path, when: dict, props: dict, asset_key: str, asset: dict
) -> pystac.Item:
    geom, proj = footprint_of(raster)
    geom = shapely.set_precision(geom, 1e-7)
    item = pystac.Item(
        id=item_id,
        geometry=shapely.geometry.mapping(geom),
        bbox=list(geom.bounds),
        datetime=when.get("datetime"),
        start_datetime=when.get("start_datetime"),
        end_datetime=when.get("end_datetime"),
        properties={**props, **proj},
    )
    item.stac_extensions = [
        "https://stac-extensions.github.io/sar/v1.1.0/schema.json",
        "https://stac-extensions.github.io/sat/v1.0.0/schema.json",
        "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
        "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
    ]
    with rasterio.open(raster) as src:
        dtype = src.dtypes[0]
    bands = asset.pop("bands")
    item.add_asset(
        asset_key,
        pystac.Asset(
            href=str(raster.relative_to(HERE)),
            media_type=pystac.MediaType.GEOTIFF,
            roles=["data"],
            extra_fields={**asset, "raster:bands": [{"data_type": dtype, **b} for b in bands]},
        ),
    )
    return item


def build() -> pystac.Catalog:
    cam = DATA / "camargue/S1A__IW___A_20150309T173017_VV_grd_mli_geo_norm_db.tif"
    sen = DATA / "sen12ms/ROIs1158_spring_s1_1_p30.tif"
    ql = DATA / "quicklook_gcps/S1A_IW_GRDH_20210119T031653_quicklook_gcps.tif"
    items = [
        make_item(
            "S1A_IW_GRD_20150309T173017_VV_camargue",
            cam,
            {"datetime": dt.datetime(2015, 3, 9, 17, 30, 17, tzinfo=UTC)},
            {
                **sar_fields(["VV"], "ascending", "sentinel-1a"),
                "title": "Camargue (FR) VV sigma0 dB crop, 20 m",
            },
            "vv",
            {
                "title": "VV backscatter, dB",
                "sar:polarizations": ["VV"],
                "bands": [{"nodata": -99.0, "unit": "dB"}],
            },
        ),
        make_item(
            "SEN12MS_ROIs1158_spring_s1_1_p30",
            sen,
            {
                "datetime": None,
                "start_datetime": dt.datetime(2017, 3, 1, tzinfo=UTC),
                "end_datetime": dt.datetime(2017, 5, 31, 23, 59, 59, tzinfo=UTC),
            },
            {
                **sar_fields(["VV", "VH"], None, "sentinel-1"),
                "title": "SEN12MS patch ROIs1158 p30 (spring 2017, day unknown), VV/VH sigma0 dB, 10 m",
            },
            "sigma0",
            {
                "title": "VV and VH backscatter, dB (band 1 VV, band 2 VH)",
                "sar:polarizations": ["VV", "VH"],
                "bands": [{"unit": "dB"}, {"unit": "dB"}],
            },
        ),
        make_item(
            "S1A_IW_GRDH_1SDV_20210119T031653_20210119T031718_036201_043ED0_8255_quicklook",
            ql,
            {"datetime": dt.datetime(2021, 1, 19, 3, 16, 53, 799379, tzinfo=UTC)},
            {
                **sar_fields(["VV", "VH"], "descending", "sentinel-1a"),
                "title": "ESA quick-look of a full IW GRD scene (Mozambique), GCPs only, uncalibrated 8-bit",
            },
            "quicklook",
            {
                "title": "Quick-look composite R=VV G=VH B=ratio, 8-bit display values (not calibrated)",
                "sar:polarizations": ["VV", "VH"],
                "fusarbatch:scale": "dn",
                "fusarbatch:quantity": "dn",
                "bands": [{"nodata": 0}, {"nodata": 0}, {"nodata": 0}],
            },
        ),
    ]
    extent = pystac.Extent(
        pystac.SpatialExtent([list(shapely.union_all([shapely.box(*i.bbox) for i in items]).bounds)]),
        pystac.TemporalExtent([[dt.datetime(2015, 3, 9, tzinfo=UTC), dt.datetime(2021, 1, 20, tzinfo=UTC)]]),
    )
    collection = pystac.Collection(
        id="fusarbatch-demo-s1",
        description=(
            "Three small real Sentinel-1 rasters for the fusarbatch demo and tests: a geocoded VV crop "
            "(Camargue), a SEN12MS VV/VH patch, and a GCP-only ESA quick-look. See ATTRIBUTION.md."
        ),
        extent=extent,
        license="various",
        title="fusarbatch demo: real Sentinel-1 samples",
    )
    collection.add_items(items)
    catalog = pystac.Catalog(id="fusarbatch-demo", description="fusarbatch embedded demo catalog")
    catalog.add_child(collection)
    return catalog


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copy-from", type=Path, help="shared data folder to copy the rasters from")
    args = parser.parse_args()
    if args.copy_from:
        copy_rasters(args.copy_from)
    catalog = build()
    for old in HERE.glob("fusarbatch-demo-s1"):
        shutil.rmtree(old)
    catalog.normalize_hrefs(str(HERE))
    # Asset hrefs were made relative to HERE; rebase them on each item's folder.
    for item in catalog.get_items(recursive=True):
        for asset in item.assets.values():
            asset.href = str(Path("../..") / asset.href)
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    print(f"wrote {HERE / 'catalog.json'}")


if __name__ == "__main__":
    main()
