"""The catalog stage: find SAR scenes over an AOI in a period (DESIGN 3.1).

:func:`search_scenes` is what the CLI calls: it parses the period, reads the AOI, resolves the catalog,
searches it, and optionally saves the scenes as stac-geoparquet so that a run is reproducible.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fusarbatch.catalog.aoi import AOI, load_aoi
from fusarbatch.catalog.dates import parse_period
from fusarbatch.catalog.scene import BandRef, Scene, save_scenes
from fusarbatch.catalog.search import DEFAULT_PAGE_SIZE, SearchResult, search
from fusarbatch.catalog.spec import CatalogSpec, resolve_catalog

__all__ = [
    "AOI",
    "BandRef",
    "CatalogSpec",
    "Scene",
    "SearchResult",
    "load_aoi",
    "parse_period",
    "resolve_catalog",
    "save_scenes",
    "search",
    "search_scenes",
]


def search_scenes(
    *,
    aoi: Path,
    start: str,
    end: str | None,
    catalog: str | None,
    collections: tuple[str, ...] = (),
    limit: int | None = None,
    save: Path | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    allow_local_assets: bool = False,
) -> SearchResult:
    """Search a catalog for the scenes over an AOI in a period (the ``search`` command).

    :param aoi: GeoJSON file (Feature, FeatureCollection or bare Polygon/MultiPolygon; any CRS declared with
        a ``crs`` member, else longitude/latitude).
    :param start: ``YYYY-MM`` (the whole month onwards) or ``YYYY-MM-DD``, UTC.
    :param end: inclusive ``YYYY-MM`` or ``YYYY-MM-DD``, UTC; ``None`` for an open period.
    :param catalog: a catalog name (``catalogs/*.toml``), STAC API URL, ``catalog.json`` or stac-geoparquet
        path; ``None`` is the embedded demo.
    :param collections: collection ids to search instead of the catalog's own.
    :param limit: at most this many scenes (see :func:`~fusarbatch.catalog.search.search`).
    :param save: write the scenes to this stac-geoparquet file (atomically).
    :param page_size: items per page of an API search.
    :param allow_local_assets: keep items of a remote catalog whose assets are local files (see
        :func:`~fusarbatch.catalog.search.search`).
    :returns: scenes sorted by (datetime, item id), the AOI share each covers, the catalog spec, the AOI
        and where the scenes were saved.
    :raises UsageError: a bad date or a start after the end.
    :raises AOIError: a bad AOI file, or an AOI that overlaps no scene in the period.
    :raises CatalogError: an unknown catalog, or one that cannot be reached or read.
    """
    first, last = parse_period(start, end)
    area = load_aoi(Path(aoi))
    spec = resolve_catalog(catalog, collections=tuple(collections))
    result = search(
        spec, area, first, last, limit=limit, page_size=page_size, allow_local_assets=allow_local_assets
    )
    if save is not None:
        saved = save_scenes(result.scenes, save)
        result = dataclasses.replace(result, saved=saved)
    return result
