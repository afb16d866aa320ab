"""Spatiotemporal AEF anchors per tile (PAPER 1.2, DESIGN 3.3) and the training anchor file formats.

Anchor grid: for a tile of ``H x W`` pixels and ``n`` (default 8), anchor ``s = i * n + j`` (raster order:
``i`` the row from the top of the tile, ``j`` the column from the left) sits at the normalised tile
position ``(y, x) = ((i + 0.5) / n, (j + 0.5) / n)``. These are the centres of an ``n x n`` partition of
the tile, so every anchor sits inside the tile, the grid is symmetric, and no two tiles that share an
edge sample the same point. The pixel coordinate is ``(x * W, y * H)`` with pixel corners on integers, so
``(0, 0)`` is the outer corner of the first pixel. It is mapped to the scene CRS with the tile's affine,
then to EPSG:4326 for the AEF lookup. The stored position is the same ``(y, x)`` in ``[0, 1]`` that was
sampled, which is what the TLM expects (``aef_positions``, official ``positions``).

``grid="edges"`` gives ``(i / (n - 1), j / (n - 1))`` instead: nodes on the tile border. That is the
paper's "regular grid over the image bbox", and it matches the min-max normalisation of the legacy
``[S, 70]`` files (:func:`read_legacy_anchors`), which always span ``[0, 1]``.

Tile store (DESIGN 3.2): ``tiles.zarr/<scene_id>/`` with ``transform (tile, 6) float64``, attrs ``crs``
(WKT2), ``datetime`` (ISO 8601, UTC), ``tile_size``, ``complete``. :func:`write_scene_features` adds:

- ``aef_features (tile, anchor, band) float16``: de-quantised AEF vectors (0 where masked)
- ``aef_positions (tile, anchor, yx) float32``: ``(y, x)`` in ``[0, 1]`` within the tile
- ``aef_mask (tile, anchor) bool``: True where the vector is valid
- attrs ``aef_source``, ``aef_year`` (layer read, or None), ``aef_acquisition_year``, ``aef_n``,
  ``aef_grid``, ``aef_coverage`` (share of valid anchors), ``aef_attribution`` (CC-BY 4.0), ``aef_error``,
  ``aef_id`` (new for every write: see :mod:`fusarbatch.outputs.provenance`) and
  ``aef_complete``. ``aef_complete`` is set to False before any array is touched and to True
  last, so a crash never leaves a group that claims features it does not fully hold. Readers must check
  it (:func:`read_scene_features` does).

Transform order: the tiler (``fusarbatch.tiling.store``) stores ``transform`` rows in rasterio/affine
order ``(a, b, c, d, e, f)`` (``x = a*col + b*row + c``, ``y = d*col + e*row + f``). It says so in the
group attr ``transform_order`` (``"a,b,c,d,e,f (affine/rasterio): ..."``). GDAL geotransform order
``(c, a, b, f, d, e)`` is also read: the attr (or the ``transform`` array's ``order`` attr) decides when it
starts with ``a,b,c,d,e,f`` / ``affine`` / ``rasterio`` or ``c,a,b,f,d,e`` / ``gdal``. Otherwise the order
is detected from where the zero rotation terms sit (see :func:`tile_affines`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from fusarbatch.errors import UsageError
from fusarbatch.features.alphaearth import AEF_ATTRIBUTION, AEF_DIM, AEFUnavailable, AnchorSource, NullSource

log = logging.getLogger(__name__)

DEFAULT_N = 8
Grid = Literal["centres", "edges"]
TransformOrder = Literal["auto", "affine", "gdal"]


@dataclass(frozen=True)
class FeatureResult:
    """What :func:`write_scene_features` did for one scene group.

    Attributes:
        scene_id: the group name.
        n_tiles: tiles in the group.
        n_anchors: anchors per tile (``S = n * n``).
        acquisition_year: year of the scene's ``datetime`` (UTC).
        aef_year: the AEF layer year read (None: no layer / no source).
        coverage: share of valid anchors over all tiles, in ``[0, 1]`` (0 for an empty group).
        source: the source name recorded as ``aef_source``.
        error: why the source was unavailable (features then empty), else None.
    """

    scene_id: str
    n_tiles: int
    n_anchors: int
    acquisition_year: int
    aef_year: int | None
    coverage: float
    source: str
    error: str | None = None


# --------------------------------------------------------------------------------------------------
# grid geometry


def anchor_positions(n: int = DEFAULT_N, grid: Grid = "centres") -> NDArray[np.float32]:
    """Normalised anchor positions within a tile.

    Args:
        n: anchors per side (``S = n * n``), >= 1 (>= 2 for ``"edges"``).
        grid: ``"centres"``: ``((i + 0.5) / n, (j + 0.5) / n)``; ``"edges"``: ``(i / (n-1), j / (n-1))``.

    Returns:
        ``(S, 2) float32`` ``(y, x)`` in ``[0, 1]``, raster order (``s = i * n + j``).
    """
    if n < 1 or (grid == "edges" and n < 2):
        raise ValueError(f"anchor grid size must be >= {2 if grid == 'edges' else 1}, not {n}")
    if grid == "centres":
        t = (np.arange(n, dtype=np.float64) + 0.5) / n
    elif grid == "edges":
        t = np.arange(n, dtype=np.float64) / (n - 1)
    else:
        raise ValueError(f"grid must be 'centres' or 'edges', not {grid!r}")
    yy, xx = np.meshgrid(t, t, indexing="ij")
    return np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.float32)


def tile_affines(transforms: ArrayLike, order: TransformOrder = "auto") -> NDArray[np.float64]:
    """Tile transforms as ``(T, 6)`` affine coefficients ``(a, b, c, d, e, f)``.

    Args:
        transforms: ``(T, 6)`` as stored in the tile store.
        order: ``"affine"`` (already ``a, b, c, d, e, f``), ``"gdal"`` (``c, a, b, f, d, e``) or
            ``"auto"``: affine when every row has ``b == d == 0`` and ``a, e != 0``, GDAL when every row
            has ``t[2] == t[4] == 0`` and ``t[1], t[5] != 0``. The two patterns cannot both hold.

    Raises:
        ValueError: ``"auto"`` on rotated/sheared transforms (give the order explicitly).
    """
    t = np.asarray(transforms, dtype=np.float64).reshape(-1, 6)
    if order == "auto":
        if t.shape[0] == 0:
            return t.copy()
        as_affine = bool(np.all((t[:, 1] == 0) & (t[:, 3] == 0) & (t[:, 0] != 0) & (t[:, 4] != 0)))
        as_gdal = bool(np.all((t[:, 2] == 0) & (t[:, 4] == 0) & (t[:, 1] != 0) & (t[:, 5] != 0)))
        if as_affine == as_gdal:
            raise ValueError(
                "cannot tell the transform order (rotated or inconsistent transforms): set the group attr "
                "transform_order to 'affine' or 'gdal'"
            )
        order = "affine" if as_affine else "gdal"
    if order == "affine":
        return t.copy()
    if order == "gdal":
        return t[:, [1, 2, 0, 4, 5, 3]].copy()
    raise ValueError(f"transform order must be 'auto', 'affine' or 'gdal', not {order!r}")


def anchor_lonlat(
    affines: ArrayLike,
    crs: Any,
    height: int,
    width: int,
    n: int = DEFAULT_N,
    grid: Grid = "centres",
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float32]]:
    """Geographic coordinates of every tile's anchors.

    Args:
        affines: ``(T, 6)`` affine coefficients ``(a, b, c, d, e, f)`` in the scene CRS (see
            :func:`tile_affines`).
        crs: the scene CRS (WKT2, ``"EPSG:..."``, or a pyproj CRS).
        height, width: tile size in pixels.
        n, grid: see :func:`anchor_positions`.

    Returns:
        ``lon (T, S) float64``, ``lat (T, S) float64`` (EPSG:4326 degrees) and ``positions (S, 2) float32``.
    """
    from pyproj import CRS, Transformer

    pos = anchor_positions(n, grid)
    a = np.asarray(affines, dtype=np.float64).reshape(-1, 6)
    px = pos[:, 1].astype(np.float64) * width  # column coordinate
    py = pos[:, 0].astype(np.float64) * height  # row coordinate
    x = a[:, 0:1] * px + a[:, 1:2] * py + a[:, 2:3]
    y = a[:, 3:4] * px + a[:, 4:5] * py + a[:, 5:6]
    to_ll = Transformer.from_crs(CRS.from_user_input(crs), 4326, always_xy=True)
    lon, lat = to_ll.transform(x, y)
    return np.asarray(lon, np.float64), np.asarray(lat, np.float64), pos


# --------------------------------------------------------------------------------------------------
# tile store


def _parse_order(text: Any) -> TransformOrder:
    """Map a stored ``transform_order`` description to ``"affine"``/``"gdal"`` (else ``"auto"``).

    The tiler writes e.g. ``"a,b,c,d,e,f (affine/rasterio): x = a*col + b*row + c, ..."``.
    """
    if not isinstance(text, str):
        return "auto"
    t = text.strip().lower()
    compact = t.replace(" ", "")
    if compact.startswith("a,b,c,d,e,f") or t.startswith(("affine", "rasterio")):
        return "affine"
    if compact.startswith("c,a,b,f,d,e") or t.startswith("gdal"):
        return "gdal"
    return "auto"


def _year_of(value: Any) -> int:
    """The UTC year of an ISO 8601 datetime (naive values are taken as UTC)."""
    if isinstance(value, datetime):
        dt = value
    else:
        text = str(value).strip()
        try:
            dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            if len(text) >= 4 and text[:4].isdigit():
                return int(text[:4])
            raise
    return dt.astimezone(UTC).year if dt.tzinfo is not None else dt.year


def _open_group(store: Any, mode: str) -> Any:
    import zarr

    if isinstance(store, zarr.Group):
        return store
    try:
        return zarr.open_group(str(store) if isinstance(store, Path) else store, mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
        raise UsageError(f"{store}: no tile store there; run `fusarbatch tile` first") from err


def write_scene_features(
    store_path: str | Path | Any,
    scene_group: str,
    source: AnchorSource,
    n: int = DEFAULT_N,
    *,
    grid: Grid = "centres",
    transform_order: TransformOrder | None = None,
) -> FeatureResult:
    """Compute and store the AEF anchors of every tile of one scene group.

    Reads ``transform``, attrs ``crs``, ``datetime``, ``tile_size`` (and the tile height/width from
    ``backscatter`` when present), samples ``source`` at the ``n x n`` anchors of every tile (one
    ``source.sample`` call per scene) for the acquisition year, and writes ``aef_features (tile, S, 64)
    float16``, ``aef_positions (tile, S, 2) float32`` and ``aef_mask (tile, S) bool`` (one tile per chunk;
    dimension names ``tile, anchor, band|yx``) plus the attrs listed in the module docstring, with
    ``aef_complete`` False during the write and True last.

    Args:
        store_path: the ``tiles.zarr`` store (path, URL or zarr Group).
        scene_group: the scene group name (scene id).
        source: the anchor source.
        n: anchors per side (``S = n * n``).
        grid: anchor layout (see :func:`anchor_positions`).
        transform_order: overrides the group attr ``transform_order`` (default: attr, else auto-detect).

    Returns:
        A :class:`FeatureResult`.

    Raises:
        AEFUnavailable: from the source; nothing is marked complete.
        UsageError: the group is missing or has no ``transform``/``crs``/``datetime``.
    """
    root = _open_group(store_path, "r+")
    try:
        group = root[scene_group]
    except KeyError as err:
        raise UsageError(f"scene group {scene_group!r} is not in the tile store {store_path}") from err
    attrs = dict(group.attrs)
    for key in ("crs", "datetime"):
        if key not in attrs:
            raise UsageError(f"tile store group {scene_group!r} lacks the attr {key!r}; re-run tiling")
    if "transform" not in group:
        raise UsageError(f"tile store group {scene_group!r} lacks the 'transform' array; re-run tiling")
    transforms = np.asarray(group["transform"][...], dtype=np.float64).reshape(-1, 6)
    if "backscatter" in group and len(group["backscatter"].shape) == 4:
        height, width = (int(v) for v in group["backscatter"].shape[-2:])
    elif "tile_size" in attrs:
        height = width = int(attrs["tile_size"])
    else:
        raise UsageError(f"tile store group {scene_group!r} has neither tile_size nor backscatter")
    order = transform_order or _parse_order(
        attrs.get("transform_order", group["transform"].attrs.get("order"))
    )
    acq_year = _year_of(attrs["datetime"])
    n_tiles = transforms.shape[0]
    s = n * n

    lon, lat, pos = anchor_lonlat(tile_affines(transforms, order), attrs["crs"], height, width, n, grid)
    if n_tiles:
        feats, mask = source.sample(lon.ravel(), lat.ravel(), acq_year)
        feats = np.array(feats, np.float32).reshape(n_tiles, s, AEF_DIM)  # a copy: zeroed below
        mask = np.asarray(mask, bool).reshape(n_tiles, s)
    else:
        feats = np.zeros((0, s, AEF_DIM), np.float32)
        mask = np.zeros((0, s), bool)
    feats[~mask] = 0.0
    positions = np.broadcast_to(pos, (n_tiles, s, 2))
    coverage = float(mask.mean()) if mask.size else 0.0
    layer = source.layer_year(acq_year)
    error = getattr(source, "error", None)

    group.attrs["aef_complete"] = False  # before anything else is touched
    arrays = (
        ("aef_features", feats.astype(np.float16), ("tile", "anchor", "band")),
        ("aef_positions", positions.astype(np.float32), ("tile", "anchor", "yx")),
        ("aef_mask", mask, ("tile", "anchor")),
    )
    for name, data, dims in arrays:
        arr = group.create_array(
            name,
            shape=data.shape,
            dtype=data.dtype,
            chunks=(1, *data.shape[1:]),
            dimension_names=dims,
            fill_value=0,
            overwrite=True,
        )
        if n_tiles:
            arr[...] = data
    group.attrs.update(
        {
            "aef_source": source.name,
            "aef_year": layer,
            "aef_acquisition_year": acq_year,
            "aef_n": n,
            "aef_grid": grid,
            "aef_coverage": coverage,
            "aef_attribution": AEF_ATTRIBUTION,
            "aef_error": error,
            "aef_id": uuid.uuid4().hex,  # this write: outputs made from it record it (outputs.provenance)
        }
    )
    group.attrs["aef_complete"] = True  # last
    return FeatureResult(scene_group, n_tiles, s, acq_year, layer, coverage, source.name, error)


def read_scene_features(
    store_path: str | Path | Any, scene_group: str
) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.bool_]]:
    """Read a scene's stored anchors (for inference).

    Returns:
        ``features (T, S, 64) float32``, ``positions (T, S, 2) float32`` (y, x in [0, 1]) and
        ``mask (T, S) bool``.

    Raises:
        KeyError: the group has no complete AEF features (``aef_complete`` not True).
    """
    group = _open_group(store_path, "r")[scene_group]
    if group.attrs.get("aef_complete") is not True:
        raise KeyError(f"scene group {scene_group!r} has no complete AEF features")
    return (
        np.asarray(group["aef_features"][...], np.float32),
        np.asarray(group["aef_positions"][...], np.float32),
        np.asarray(group["aef_mask"][...], bool),
    )


def compute_features(
    store: str | Path | Any,
    source: AnchorSource,
    n: int = DEFAULT_N,
    scene_ids: Iterable[str] | None = None,
    *,
    grid: Grid = "centres",
    on_unavailable: Literal["empty", "raise"] = "empty",
) -> list[FeatureResult]:
    """Write AEF anchors for every complete scene group of a tile store (the ``features`` command).

    Args:
        store: the ``tiles.zarr`` store.
        source: the anchor source.
        n, grid: anchor grid (see :func:`anchor_positions`).
        scene_ids: only these groups (default: every group whose attr ``complete`` is True, sorted).
        on_unavailable: when the source raises :class:`AEFUnavailable`: ``"empty"`` logs one warning
            and writes empty masks for this and every later scene (``aef_error`` records why);
            ``"raise"`` propagates it.

    Returns:
        One :class:`FeatureResult` per scene processed, in order.

    Raises:
        UsageError: a requested scene id is not in the store or its tiling is not complete.
        AEFUnavailable: with ``on_unavailable="raise"``.
    """
    root = _open_group(store, "r+")
    complete = {name for name, g in root.groups() if g.attrs.get("complete") is True}
    if scene_ids is None:
        todo = sorted(complete)
    else:
        todo = list(scene_ids)
        bad = [s for s in todo if s not in complete]
        if bad:
            raise UsageError(
                f"scene(s) {', '.join(bad)} not tiled (or tiling incomplete) in {store}; run `tile` first"
            )
    results = []
    for scene_id in todo:
        if on_unavailable == "raise":
            results.append(write_scene_features(root, scene_id, source, n, grid=grid))
        else:
            result, source = write_scene_features_or_empty(root, scene_id, source, n, grid=grid)
            results.append(result)
    return results


def write_scene_features_or_empty(
    store_path: str | Path | Any,
    scene_group: str,
    source: AnchorSource,
    n: int = DEFAULT_N,
    *,
    grid: Grid = "centres",
) -> tuple[FeatureResult, AnchorSource]:
    """:func:`write_scene_features`; when ``source`` turns out unavailable (:class:`AEFUnavailable`: an
    unreadable index, a COG gone from a mirror), log one warning and write empty anchors instead.

    :returns: the result and the source to use for the next scenes (a :class:`NullSource` recording why,
        once ``source`` failed).
    """
    try:
        return write_scene_features(store_path, scene_group, source, n, grid=grid), source
    except AEFUnavailable as err:
        log.warning("AlphaEarth anchors disabled for this run (empty masks): %s", err)
        source = NullSource(f"none (unavailable: {source.name})", error=str(err))
        return write_scene_features(store_path, scene_group, source, n, grid=grid), source


# --------------------------------------------------------------------------------------------------
# training anchor files (official FUSAR-GPT formats, PAPER 1.2 / data.py)


def _check_anchors(features: NDArray[np.float32], positions: NDArray[np.float32], what: str) -> None:
    if features.ndim != 2 or features.shape[1] != AEF_DIM or features.shape[0] == 0:
        raise ValueError(f"{what}: features must be [S, 64] with S > 0, got {list(features.shape)}")
    if positions.shape != (features.shape[0], 2):
        raise ValueError(f"{what}: positions must be [S, 2], got {list(positions.shape)}")
    if not (np.isfinite(features).all() and np.isfinite(positions).all()):
        raise ValueError(f"{what}: non-finite features or positions")
    if (positions < 0).any() or (positions > 1).any():
        raise ValueError(f"{what}: positions must lie in [0, 1]")


def write_anchor_npz(
    path: str | Path,
    features: ArrayLike,
    positions: ArrayLike,
    mask: ArrayLike | None = None,
) -> int:
    """Write the official training anchor file: ``.npz`` with ``features [S, 64] float32`` and ``positions
    [S, 2] float32`` (y, x in [0, 1]).

    The official format has no mask, and its loader treats every row as valid and needs S > 0. So with
    ``mask`` only the valid rows are written.

    Returns:
        The number of anchors written.

    Raises:
        ValueError: bad shapes, non-finite values, positions outside [0, 1], or no valid anchor.
    """
    f = np.asarray(features, np.float32).reshape(-1, AEF_DIM)
    p = np.asarray(positions, np.float32).reshape(-1, 2)
    if mask is not None:
        m = np.asarray(mask, bool).reshape(-1)
        f, p = f[m], p[m]
    _check_anchors(f, p, str(path))
    with open(path, "wb") as fh:
        np.savez(fh, features=f, positions=p)
    return int(f.shape[0])


def read_anchor_npz(path: str | Path) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Read an official ``.npz`` anchor file.

    Returns:
        ``features (S, 64) float32`` and ``positions (S, 2) float32`` (y, x in [0, 1]).

    Raises:
        ValueError: missing keys, bad shapes, non-finite values or positions outside [0, 1].
    """
    with np.load(path, allow_pickle=False) as data:
        if "features" not in data or "positions" not in data:
            raise ValueError(f"{path}: an anchor .npz needs 'features' and 'positions'")
        f = np.asarray(data["features"], np.float32)
        p = np.asarray(data["positions"], np.float32)
    _check_anchors(f, p, str(path))
    return f, p


LEGACY_COLUMNS: tuple[str, ...] = ("lon", "lat", "row", "col", "x", "y", *(f"A{i:02d}" for i in range(64)))
"""Column order of the legacy ``[S, 70]`` anchor arrays."""


def _minmax(a: NDArray[np.float64]) -> NDArray[np.float32]:
    span = float(a.max() - a.min())
    if span > 0:
        return ((a - a.min()) / span).astype(np.float32)
    return np.zeros_like(a, dtype=np.float32)


def read_legacy_anchors(source: str | Path | ArrayLike) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Read the legacy anchor layout: ``[S, 70]`` = ``lon, lat, row, col, x, y, A00..A63`` (a ``.npy``
    file, a numeric array, or a structured array with those field names).

    Positions are the min-max normalised pixel ``(y, x)`` columns (for a structured array without
    ``x``/``y``: ``row``/``col``), as the official loader does. A constant column gives 0.

    Returns:
        ``features (S, 64) float32`` and ``positions (S, 2) float32`` (y, x in [0, 1]).

    Raises:
        ValueError: not an ``[S, 70]`` layout, or invalid values.
    """
    arr = np.load(source, allow_pickle=False) if isinstance(source, str | Path) else np.asarray(source)
    what = str(source) if isinstance(source, str | Path) else "legacy anchors"
    if arr.dtype.names:
        rec = arr.reshape(-1)
        names = rec.dtype.names
        bands = sorted(
            (nm for nm in names if nm[:1] in "aA" and nm[1:].isdigit()), key=lambda nm: int(nm[1:])
        )
        if len(bands) != AEF_DIM:
            raise ValueError(f"{what}: expected 64 band fields A00..A63, found {len(bands)}")
        f = np.column_stack([rec[nm] for nm in bands]).astype(np.float32)
        if "x" in names and "y" in names:
            xs, ys = rec["x"], rec["y"]
        else:
            xs, ys = rec["col"], rec["row"]
    else:
        if arr.ndim == 1 and arr.size % len(LEGACY_COLUMNS) == 0:
            arr = arr.reshape(-1, len(LEGACY_COLUMNS))
        if arr.ndim != 2 or arr.shape[1] != len(LEGACY_COLUMNS):
            raise ValueError(f"{what}: expected an [S, 70] array, got {list(arr.shape)}")
        f = arr[:, 6:].astype(np.float32)
        xs, ys = arr[:, 4], arr[:, 5]
    p = np.stack([_minmax(np.asarray(ys, np.float64)), _minmax(np.asarray(xs, np.float64))], axis=1)
    _check_anchors(f, p, what)
    return f, p


def write_legacy_anchors(
    path: str | Path,
    lon: Sequence[float] | ArrayLike,
    lat: Sequence[float] | ArrayLike,
    row: ArrayLike,
    col: ArrayLike,
    x: ArrayLike,
    y: ArrayLike,
    features: ArrayLike,
) -> NDArray[np.float64]:
    """Write a legacy ``[S, 70]`` ``.npy`` (``lon, lat, row, col, x, y, A00..A63``, float64).

    Returns:
        The array written.
    """
    f = np.asarray(features, np.float64).reshape(-1, AEF_DIM)
    cols = [np.asarray(v, np.float64).reshape(-1) for v in (lon, lat, row, col, x, y)]
    if any(c.shape[0] != f.shape[0] for c in cols):
        raise ValueError("legacy anchor columns differ in length")
    arr = np.column_stack([*cols, f])
    with open(path, "wb") as fh:
        np.save(fh, arr)
    return arr
