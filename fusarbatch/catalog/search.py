"""Find the scenes over an AOI in a period: STAC API, static catalog or stac-geoparquet (DESIGN 3.1).

- ``api``: pystac-client ``Client.open(...).search(collections, intersects, datetime)``, paged with
  ``limit=page_size``. Every HTTP request has a hard deadline of ``spec.timeout_s`` (+1 s): an
  unreachable host, a refused connection, an HTTP error or a server that accepts and never answers becomes
  one :class:`~fusarbatch.errors.CatalogError` line, never a hang or a traceback.
- ``static``: the catalog is read with pystac and walked (``search()`` does not work on static
  catalogs); asset hrefs are made absolute.
- ``geoparquet``: items are read with :func:`~fusarbatch.catalog.scene.read_items_parquet`.

Every kind is then filtered client-side the same way (the API's answer too, so that all kinds agree): the
footprint must overlap the AOI with a non-zero area, and the acquisition time must fall in
``[start, end]`` (an item with only ``start_datetime``/``end_datetime`` matches when its range overlaps
the period). Items that cannot become a :class:`~fusarbatch.catalog.scene.Scene` (no polarisation
asset, no datetime) are skipped with a warning on the ``fusarbatch.catalog`` logger.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

import shapely
from shapely.geometry import mapping, shape
from shapely.geometry.base import BaseGeometry

from fusarbatch.catalog.aoi import AOI, fix_antimeridian, query_geometry
from fusarbatch.catalog.scene import Scene, _parse_datetime, read_items_parquet
from fusarbatch.catalog.spec import CatalogSpec
from fusarbatch.errors import AOIError, CatalogError, UsageError

log = logging.getLogger("fusarbatch.catalog")

#: Items asked for per page of an API search.
DEFAULT_PAGE_SIZE = 100
#: Seconds added to ``spec.timeout_s`` for the hard deadline of one HTTP request.
DEADLINE_MARGIN_S = 1.0
#: Largest answer to one HTTP request, bytes (a page of 100 Sentinel-1 items is about 1 MB).
MAX_RESPONSE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class SearchResult:
    """What a search found."""

    scenes: list[Scene]
    """Matching scenes sorted by (datetime, item id), at most ``limit``."""
    coverage: dict[str, float]
    """Item id -> share of the AOI's geodesic area (WGS84 ellipsoid) that the scene footprint covers,
    0..1."""
    spec: CatalogSpec
    """The catalog searched."""
    aoi: AOI
    """The AOI, EPSG:4326."""
    saved: Path | None = None
    """Where the scenes were written as stac-geoparquet, when they were."""


def search(
    spec: CatalogSpec,
    aoi: AOI,
    start: dt.datetime,
    end: dt.datetime | None = None,
    *,
    limit: int | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    allow_local_assets: bool = False,
) -> SearchResult:
    """Scenes of catalog ``spec`` whose footprint overlaps ``aoi`` and whose time falls in [start, end].

    :param start: first instant, timezone-aware (UTC); see :func:`~fusarbatch.catalog.dates.parse_period`.
    :param end: last instant, inclusive; ``None`` for an open period.
    :param limit: at most this many scenes. Static and geoparquet catalogs keep the earliest; an API is
        asked to sort by ascending datetime when it supports sorting, otherwise the first ``limit``
        scenes in the server's order are kept. Either way the result is sorted by (datetime, id).
    :param page_size: items per page of an API search.
    :param allow_local_assets: read local assets of a remote catalog. By default an item of a remote
        catalog (an ``http(s)://`` API or catalog.json) whose asset href is a local path, a ``file://`` URL
        or a GDAL ``/vsi`` path to a local file is skipped with a warning: a catalog on someone else's
        server must not make the run read this machine's files.
    :returns: the scenes (sorted by datetime, then item id) and the share of the AOI each covers;
        ``saved`` is ``None``.
    :raises AOIError: nothing in the catalog overlaps the AOI in the period.
    :raises CatalogError: the catalog cannot be opened, read or searched (one line naming it and the
        reason), or took longer than ``spec.search_timeout_s`` or sent more than ``spec.max_search_mb``;
        or items match but none has an asset for any polarisation, or only local ones (remote catalog).
    :raises UsageError: ``limit`` or ``page_size`` below 1.
    """
    if limit is not None and limit < 1:
        raise UsageError(f"--limit {limit}: expected a whole number >= 1")
    if page_size < 1:
        raise UsageError(f"page size {page_size}: expected a whole number >= 1")
    if spec.kind == "api":
        items: Iterable[dict[str, Any]] = _api_items(spec, aoi, start, end, page_size, sort=limit is not None)
    elif spec.kind == "static":
        items = _static_items(spec)
    elif spec.kind == "geoparquet":
        items = read_items_parquet(spec.href)
    else:
        raise CatalogError(
            f"catalog {_label(spec)}: unknown kind {spec.kind!r}; use api, static or geoparquet"
        )

    spec.signer()  # a missing signer is the catalog's error, not every item's
    shapely.prepare(aoi.geometry)  # one index for every item's intersection test
    stream = spec.kind == "api"
    scenes: list[Scene] = []
    coverage: dict[str, float] = {}
    matched = 0
    refused = 0
    remote = "://" in spec.href
    seen: set[str] = set()
    for item in items:
        item_id = str(item.get("id", ""))
        if item_id in seen:
            log.debug("item %r: seen twice; kept the first", item_id)
            continue
        seen.add(item_id)
        share = _match(item, aoi, start, end)
        if share is None:
            continue
        matched += 1
        try:
            scene = Scene.from_item(item, spec)
        except CatalogError as exc:
            log.warning("skipped: %s", exc)
            continue
        local = [ref.href for ref in scene.bands.values() if is_local_href(ref.href)]
        if remote and local and not allow_local_assets:
            refused += 1
            log.warning(
                "skipped: item %r of the remote catalog %r names the local file %s; refused "
                "(--allow-local-assets reads it)",
                scene.item_id,
                spec.name,
                local[0],
            )
            continue
        scenes.append(scene)
        coverage[scene.item_id] = share
        if stream and limit is not None and len(scenes) >= limit:
            break
    scenes.sort(key=lambda s: (s.datetime, s.item_id))
    if limit is not None:
        scenes = scenes[:limit]
    coverage = {s.item_id: coverage[s.item_id] for s in scenes}
    if not scenes:
        period = f"between {start.date()} and {end.date()}" if end else f"from {start.date()} on"
        if refused:
            raise CatalogError(
                f"catalog {spec.name!r}: {refused} item(s) overlap --aoi {aoi.source} {period} but their "
                f"assets are local files, which a remote catalog may not name; pass --allow-local-assets "
                f"if you trust the catalog"
            )
        if matched:
            raise CatalogError(
                f"catalog {spec.name!r}: {matched} item(s) overlap --aoi {aoi.source} {period} but none has "
                f"an asset for any polarisation; set `assets` in the catalog definition"
            )
        raise AOIError(
            f"--aoi {aoi.source} overlaps no scene of catalog {spec.name!r} {period}; "
            f"check the AOI, dates or catalog"
        )
    return SearchResult(scenes=scenes, coverage=coverage, spec=spec, aoi=aoi)


#: GDAL virtual file systems that read over the network (every other ``/vsi`` path reads local files).
_REMOTE_VSI = ("/vsicurl", "/vsis3", "/vsigs", "/vsiaz", "/vsiadls", "/vsioss", "/vsiswift", "/vsihdfs")


def is_local_href(href: str) -> bool:
    """Whether an asset href reads this machine's files: a path, a ``file://`` URL, a one-letter scheme
    (a Windows drive), or a GDAL ``/vsi`` path other than the network ones (``/vsicurl/``, ``/vsis3/``
    ...; ``/vsizip/`` or ``/vsigzip/`` over a local file is local, over ``/vsicurl/`` remote)."""
    text = str(href).strip()
    if text.startswith("/vsi"):
        parts = [p for p in text.split("/") if p.startswith("vsi")]
        return not any(f"/{p}".startswith(_REMOTE_VSI) for p in parts)
    scheme = urlparse(text).scheme.lower()
    return len(scheme) <= 1 or scheme == "file"


# ---------------------------------------------------------------------------------------------------------
# client-side filter


def _match(item: dict[str, Any], aoi: AOI, start: dt.datetime, end: dt.datetime | None) -> float | None:
    """The AOI share the item covers when it matches (in time, and overlapping with area > 0), else None."""
    item_id = item.get("id")
    props = item.get("properties") or {}
    try:
        first, last = _item_interval(props)
    except (TypeError, ValueError) as exc:
        log.warning("skipped: item %r has an unreadable datetime (%s)", item_id, exc)
        return None
    if first is None or last is None:
        log.warning("skipped: item %r has no datetime or start_datetime", item_id)
        return None
    if last < start or (end is not None and first > end):
        return None
    footprint = _footprint(item)
    if footprint is None:
        return None
    if not shapely.intersects(aoi.geometry, footprint):
        return None
    share = aoi.coverage(footprint)
    return share if share > 0 else None


def _item_interval(props: dict[str, Any]) -> tuple[dt.datetime | None, dt.datetime | None]:
    """(first, last) instant of an item: its ``datetime`` twice, or its start/end range."""
    if props.get("datetime"):
        when = _parse_datetime(props["datetime"])
        return when, when
    first = _parse_datetime(props["start_datetime"]) if props.get("start_datetime") else None
    last = _parse_datetime(props["end_datetime"]) if props.get("end_datetime") else first
    return first, last


def _footprint(item: dict[str, Any]) -> BaseGeometry | None:
    """Item geometry (or bbox) in EPSG:4326, valid, split at the antimeridian; ``None`` (logged) if
    unusable."""
    item_id = item.get("id")
    try:
        if item.get("geometry"):
            geometry = shape(item["geometry"])
        elif item.get("bbox"):
            bbox = list(item["bbox"])
            west, south, east, north = bbox[:2] + bbox[-3:-1] if len(bbox) == 6 else bbox[:4]
            if east < west:  # a bbox across the antimeridian (RFC 7946 5.2)
                geometry = shapely.union(
                    shapely.box(west, south, 180, north), shapely.box(-180, south, east, north)
                )
            else:
                geometry = shapely.box(west, south, east, north)
        else:
            log.warning("skipped: item %r has no geometry or bbox", item_id)
            return None
        geometry = fix_antimeridian(geometry)
        if not geometry.is_valid:
            geometry = shapely.make_valid(geometry)
    except Exception as exc:  # malformed GeoJSON from an untrusted catalog: shapely raises many types
        log.warning("skipped: item %r has a malformed geometry (%s)", item_id, _one_line(exc))
        return None
    return geometry


# ---------------------------------------------------------------------------------------------------------
# static catalogs


def _static_items(spec: CatalogSpec) -> list[dict[str, Any]]:
    """Item dicts of a static catalog (asset hrefs absolute), restricted to ``spec.collections``."""
    with warnings.catch_warnings():
        # read over HTTP through pystac-client's IO, which warns that it falls back to pystac
        warnings.simplefilter("ignore", UserWarning)
        return _walk_static(spec)


def _walk_static(spec: CatalogSpec) -> list[dict[str, Any]]:
    import pystac

    io = _stac_io(spec)
    try:
        root = pystac.read_file(spec.href, stac_io=io)
    except Exception as exc:  # pystac raises many types for a missing or malformed file
        raise _catalog_error(spec, exc, "cannot read it") from None
    if not isinstance(root, pystac.Catalog):
        raise CatalogError(
            f"catalog {spec.name!r}: {spec.href} is a STAC {type(root).__name__}, not a Catalog or "
            f"Collection; give the catalog.json"
        )
    try:
        sources: list[pystac.Catalog] = [root]
        if spec.collections:
            wanted = set(spec.collections)
            sources = [root] if isinstance(root, pystac.Collection) and root.id in wanted else []
            sources += [c for c in _children(root) if c.id in wanted]
            found = {c.id for c in sources}
            if not found:
                available = sorted(c.id for c in _children(root)) or ["none"]
                raise CatalogError(
                    f"catalog {_label(spec)}: no collection {', '.join(sorted(wanted))}; "
                    f"available: {', '.join(available)}"
                )
            for missing in sorted(wanted - found):
                log.warning("catalog %r: no collection %r", spec.name, missing)
    except CatalogError:
        raise
    except Exception as exc:
        raise _catalog_error(spec, exc, "cannot read a child of it") from None
    items: list[dict[str, Any]] = []
    visited: set[str] = set()
    for source in sources:
        items.extend(_linked_items(source, visited))
    return items


def _linked(catalog: Any, rel: str, visited: set[str]) -> Iterator[tuple[str, Any]]:
    """``(href, object)`` for each ``rel`` link of ``catalog`` not visited yet; the object is the resolved
    STAC object, or the exception that resolving it raised (untrusted catalog: pystac raises many types)."""
    for link in catalog.get_links(rel):
        href = link.get_absolute_href() or str(link.href)
        if href in visited:
            continue
        visited.add(href)
        try:
            yield href, link.resolve_stac_object(root=catalog.get_root()).target
        except Exception as exc:
            yield href, exc


def _children(catalog: Any, visited: set[str] | None = None) -> list[Any]:
    """Every Catalog/Collection below ``catalog`` (recursively); an unreadable child is skipped with a
    warning, and a link cycle is followed once."""
    import pystac

    visited = set() if visited is None else visited
    out = []
    for href, child in _linked(catalog, "child", visited):
        if isinstance(child, Exception):
            log.warning("skipped: child %s of catalog %r (%s)", href, catalog.id, _reason(child))
        elif isinstance(child, pystac.Catalog):
            out.append(child)
            out.extend(_children(child, visited))
    return out


def _linked_items(catalog: Any, visited: set[str]) -> list[dict[str, Any]]:
    """Item dicts (absolute asset hrefs) linked from ``catalog`` and its children. An item that cannot be
    read (missing file, bad JSON, bad datetime, not an Item) is skipped with a warning naming it."""
    import pystac

    items = []
    for source in [catalog, *_children(catalog, set())]:
        for href, item in _linked(source, "item", visited):
            try:
                if isinstance(item, Exception):
                    raise item
                if not isinstance(item, pystac.Item):
                    raise TypeError(f"a STAC {type(item).__name__}, not an Item")
                item.make_asset_hrefs_absolute()
                items.append(item.to_dict(include_self_link=False, transform_hrefs=False))
            except Exception as exc:  # untrusted catalog: pystac raises many types
                log.warning("skipped: item %s (%s)", href, _reason(exc))
    return items


# ---------------------------------------------------------------------------------------------------------
# STAC APIs


class _DeadlineError(Exception):
    """One HTTP request took longer than its deadline."""


class _SearchDeadlineError(Exception):
    """The whole search (or walk of a static catalog) took longer than ``spec.search_timeout_s``."""


class _TooLargeError(Exception):
    """An answer, or all answers of one search together, exceeded their byte cap."""


def _stac_io(spec: CatalogSpec) -> Any:
    """A pystac-client ``StacApiIO`` for one search (or walk of a static catalog), with bounds on time and
    bytes:

    - every request ends within ``spec.timeout_s`` + 1 s, and all requests of the search within
      ``spec.search_timeout_s`` (a server whose pages never end);
    - one answer may hold at most :data:`MAX_RESPONSE_BYTES` (a body that never ends is cut there, whatever
      its ``Content-Length`` says), all answers together ``spec.max_search_mb`` MiB.

    Connection failures are retried twice; timed-out reads and HTTP errors are not retried (a STAC search is
    read-only, so retrying is safe, but it would multiply the wait). ``Retry-After`` is not honoured.

    Local files (a static catalog on disk and the files it links to) are read only when the catalog itself
    is local: as regular files (a FIFO or device is refused before it is opened) of at most
    :data:`~fusarbatch.files.MAX_JSON_BYTES` bytes. A remote catalog never makes this read a local
    file.
    """
    from pystac_client.stac_api_io import StacApiIO
    from urllib3.util.retry import Retry

    from fusarbatch.files import MAX_JSON_BYTES, read_capped

    timeout = float(spec.timeout_s)
    deadline = timeout + DEADLINE_MARGIN_S
    search_ends = time.monotonic() + float(spec.search_timeout_s)
    budget = {"bytes": int(float(spec.max_search_mb) * 2**20)}
    local_catalog = "://" not in spec.href

    def capped_body(resp: Any, *args: Any, **kwargs: Any) -> Any:
        """A requests response hook: runs before requests reads the body, and reads it here, capped."""
        cap = min(MAX_RESPONSE_BYTES, budget["bytes"])
        length = str(resp.headers.get("Content-Length", "")).strip()
        chunks: list[bytes] = []
        total = 0
        try:
            if length.isdigit() and int(length) > cap:
                raise _TooLargeError(int(length))
            for chunk in resp.iter_content(2**16):
                total += len(chunk)
                if total > cap:
                    raise _TooLargeError(total)
                chunks.append(chunk)
        except _TooLargeError:
            resp.close()
            raise
        finally:
            budget["bytes"] -= total
        resp._content = b"".join(chunks)
        return resp

    class DeadlineStacApiIO(StacApiIO):
        def read_text(self, source: Any, *args: Any, **kwargs: Any) -> str:
            href = str(os.fspath(source)) if isinstance(source, str | os.PathLike) else None
            parsed = urlparse(str(href))
            if href is None or (len(parsed.scheme) > 1 and parsed.scheme != "file"):  # a Link or a URL
                return super().read_text(source, *args, **kwargs)
            if not local_catalog:
                raise CatalogError(f"{href}: a local file linked from a remote catalog; not read")
            path = parsed.path if parsed.scheme == "file" else str(href)
            return read_capped(path, "STAC file", CatalogError, MAX_JSON_BYTES).decode("utf-8")

        def request(
            self,
            href: str,
            method: str | None = None,
            headers: dict[str, str] | None = None,
            parameters: dict[str, Any] | None = None,
        ) -> str:
            left = search_ends - time.monotonic()
            if left <= 0:
                raise _SearchDeadlineError(href)
            if budget["bytes"] <= 0:
                raise _TooLargeError("search")
            # requests' timeout bounds the connection and each read, not the whole exchange (nor DNS):
            # the request runs in a daemon thread that is abandoned at the deadline.
            box: dict[str, Any] = {}

            def run() -> None:
                try:
                    box["text"] = StacApiIO.request(self, href, method, headers, parameters)
                except BaseException as exc:
                    box["error"] = exc

            worker = threading.Thread(target=run, name="fusarbatch-stac-request", daemon=True)
            worker.start()
            worker.join(min(deadline, left))
            if worker.is_alive():
                raise _DeadlineError(href) if left > deadline else _SearchDeadlineError(href)
            if "error" in box:
                raise box["error"]
            return box["text"]

    retry = Retry(
        total=2,
        connect=2,
        read=0,
        status=0,
        other=0,
        backoff_factor=0.2,
        respect_retry_after_header=False,
        raise_on_status=False,
    )
    io = DeadlineStacApiIO(timeout=(timeout, timeout), max_retries=retry)
    io.session.hooks["response"].append(capped_body)
    return io


def _api_items(
    spec: CatalogSpec,
    aoi: AOI,
    start: dt.datetime,
    end: dt.datetime | None,
    page_size: int,
    *,
    sort: bool,
) -> Iterator[dict[str, Any]]:
    """Item dicts from a STAC API search, page by page, asset hrefs made absolute."""
    from pystac_client import Client, ConformanceClasses
    from pystac_client.exceptions import APIError
    from pystac_client.warnings import PystacClientWarning

    io = _stac_io(spec)
    timeout = float(spec.timeout_s)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PystacClientWarning)
            client = Client.open(spec.href, stac_io=io, timeout=(timeout, timeout))
    except (APIError, _DeadlineError) as exc:
        raise _catalog_error(spec, exc) from None
    except Exception as exc:  # pystac raises many types when the answer is not a STAC catalog
        raise _catalog_error(spec, exc, "did not answer with a STAC API landing page") from None
    if not client.conforms_to(ConformanceClasses.ITEM_SEARCH):
        raise CatalogError(
            f"catalog {spec.name!r}: {spec.href} does not offer STAC item search; give a STAC API root URL "
            f"(or the catalog.json of a static catalog)"
        )
    kwargs: dict[str, Any] = {
        "collections": list(spec.collections) or None,
        "intersects": mapping(query_geometry(aoi)),  # bounded size; the exact AOI filters below
        "datetime": [start, end],
        "limit": page_size,
    }
    if sort and client.conforms_to(ConformanceClasses.SORT):
        kwargs["sortby"] = [{"field": "properties.datetime", "direction": "asc"}]
    seen: set[str] = set()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PystacClientWarning)  # e.g. "does not conform to SORT"
            pages = client.search(**kwargs).pages_as_dicts()
        while True:
            # The warning filter is set around each page fetch only: it must not leak to the consumer
            # between two yields.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PystacClientWarning)
                page = next(pages, None)
            if page is None:
                return
            features = [f for f in page.get("features") or [] if isinstance(f, dict)]
            ids = {str(f.get("id")) for f in features}
            if ids and ids <= seen:
                log.warning("catalog %r: the API sent a page of items already seen; stopped", spec.name)
                return
            seen |= ids
            for feature in features:
                yield _absolute_hrefs(feature)
    except (APIError, _DeadlineError) as exc:
        raise _catalog_error(spec, exc) from None
    except Exception as exc:
        raise _catalog_error(spec, exc, "sent an answer that is not a STAC item search page") from None


def _absolute_hrefs(item: dict[str, Any]) -> dict[str, Any]:
    """Resolve relative asset hrefs against the item's ``self`` link (when it has one)."""
    links = [link for link in item.get("links") or [] if isinstance(link, dict)]
    base = next((link.get("href") for link in links if link.get("rel") == "self"), None)
    if not base:
        return item
    for asset in (item.get("assets") or {}).values():
        href = asset.get("href") if isinstance(asset, dict) else None
        if isinstance(href, str) and href and not urlparse(href).scheme and not href.startswith("/"):
            asset["href"] = urljoin(base, href)
    return item


# ---------------------------------------------------------------------------------------------------------
# errors


def _catalog_error(spec: CatalogSpec, exc: BaseException, what: str | None = None) -> CatalogError:
    """One line: which catalog, what went wrong (classified from the exception chain), and the fix."""
    chain = _chain(exc)
    timeout = f"{float(spec.timeout_s):g}"
    fix = "check the URL or your network"
    if any(isinstance(e, _SearchDeadlineError) for e in chain):
        return CatalogError(
            f"catalog {_label(spec)}: the search did not end within {float(spec.search_timeout_s):g} s "
            f"(pages that never end?); narrow the AOI or dates, or raise `search_timeout_s` in a catalog "
            f"definition"
        )
    if any(isinstance(e, _TooLargeError) for e in chain):
        return CatalogError(
            f"catalog {_label(spec)}: the server sent more than {MAX_RESPONSE_BYTES // 2**20} MiB in one "
            f"answer, or {float(spec.max_search_mb):g} MiB in all; narrow the AOI or dates, or raise "
            f"`max_search_mb` in a catalog definition"
        )
    # Order matters: urllib3's NewConnectionError (refused, DNS) subclasses its ConnectTimeoutError.
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return CatalogError(f"catalog {_label(spec)}: cannot reach it (connection refused); {fix}")
    if any(type(e).__name__ in ("NameResolutionError", "gaierror") for e in chain):
        host = urlparse(spec.href).hostname or spec.href
        return CatalogError(f"catalog {_label(spec)}: cannot reach it (unknown host {host!r}); {fix}")
    if any(isinstance(e, _DeadlineError | TimeoutError) or "Timeout" in type(e).__name__ for e in chain):
        return CatalogError(
            f"catalog {_label(spec)}: cannot reach it (no answer within {timeout} s); {fix}, "
            f"or raise FUSARBATCH_HTTP_TIMEOUT"
        )
    status = next((getattr(e, "status_code", None) for e in chain if getattr(e, "status_code", None)), None)
    if status:
        detail = _one_line(exc, 120)
        return CatalogError(
            f"catalog {_label(spec)}: the server answered HTTP {status}"
            f"{f' ({detail})' if detail else ''}; check the URL and collections"
        )
    if any(_named(e, "ConnectionError") or isinstance(e, ConnectionError) for e in chain):
        return CatalogError(f"catalog {_label(spec)}: cannot reach it ({_one_line(exc, 120)}); {fix}")
    if any(isinstance(e, FileNotFoundError) for e in chain):
        return CatalogError(f"catalog {spec.name!r}: {spec.href}: no such file; check the path")
    return CatalogError(
        f"catalog {_label(spec)}: {what or 'request failed'} ({type(exc).__name__}: {_one_line(exc, 160)}); "
        f"check {spec.href}"
    )


def _label(spec: CatalogSpec) -> str:
    """``'name'`` for a URL or path given as is, ``'name' (href)`` for a named catalog."""
    return repr(spec.name) if spec.name == spec.href else f"{spec.name!r} ({spec.href})"


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception, its causes/contexts, and exceptions held in args or ``reason`` (urllib3), once each."""
    out: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo and len(out) < 50:
        e = todo.pop()
        if any(e is seen for seen in out):
            continue
        out.append(e)
        for nxt in (e.__cause__, e.__context__, getattr(e, "reason", None), *getattr(e, "args", ())):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    return out


def _reason(exc: BaseException) -> str:
    """One line for a skipped child or item: our own reason when one is in the chain (a FIFO refused, a
    local file of a remote catalog), else the exception's."""
    ours = [e for e in _chain(exc) if isinstance(e, CatalogError)]
    return _one_line(ours[0] if ours else exc)


def _named(exc: BaseException, name: str) -> bool:
    """Whether ``exc`` has a class called ``name`` in its MRO (requests/urllib3 classes without importing)."""
    return any(name in cls.__name__ for cls in type(exc).__mro__)


def _one_line(exc: BaseException, width: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= width else text[: width - 3] + "..."
