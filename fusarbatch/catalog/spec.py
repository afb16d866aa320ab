"""Named catalogs: ``catalogs/<name>.toml`` -> :class:`CatalogSpec` (DESIGN 3.1).

A ``--catalog`` value is resolved in this order:

1. a name of a file in the catalogs directory (``demo``, ``earth-search``, ``planetary-computer``);
2. an ``http(s)://`` URL: a STAC API (a URL ending in ``.json`` is read as a static catalog);
3. a local path: ``*.parquet`` is a stac-geoparquet file, a ``*.json`` file or a folder holding
   ``catalog.json`` is a static catalog, a ``*.toml`` file is a catalog definition.

The TOML keys are those of :class:`CatalogSpec`; unknown keys are an error that names the key.

``$FUSARBATCH_HTTP_TIMEOUT`` (seconds, > 0), when set, overrides ``timeout_s`` of every catalog read over
HTTP (an API, or a static catalog at an ``http(s)://`` URL): e.g. ``FUSARBATCH_HTTP_TIMEOUT=5`` makes an
unreachable or silent server fail after about 5 s instead of the default 20 s.
"""

from __future__ import annotations

import importlib
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fusarbatch.errors import CatalogError
from fusarbatch.files import MAX_TOML_BYTES, check_regular, read_capped

Kind = Literal["api", "static", "geoparquet"]
Scale = Literal["db", "power", "amplitude", "dn"]
Quantity = Literal["sigma0", "gamma0", "beta0", "dn"]

#: Default polarisation -> candidate asset keys (first present wins).
DEFAULT_ASSETS: dict[str, tuple[str, ...]] = {
    "VV": ("vv", "VV"),
    "VH": ("vh", "VH"),
    "HH": ("hh", "HH"),
    "HV": ("hv", "HV"),
}

#: Built-in href signers, by the name used in a catalog's ``sign`` key.
BUILTIN_SIGNERS: dict[str, str] = {"planetary-computer": "planetary_computer:sign"}


@dataclass(frozen=True)
class CatalogSpec:
    """Where scenes come from and how to read their assets.

    :param name: short name shown in tables and logs.
    :param kind: ``api`` (STAC API, searched server-side), ``static`` (a static catalog, walked and filtered
        client-side) or ``geoparquet`` (a stac-geoparquet file, filtered client-side).
    :param href: URL or absolute path of the API root, ``catalog.json`` or ``.parquet`` file.
    :param collections: collection ids to search; empty means all.
    :param assets: polarisation (``VV``, ``VH``, ``HH``, ``HV``) -> asset keys tried in order.
    :param quantity: backscatter quantity of the assets when an item does not say (``sigma0`` for GRD,
        ``gamma0`` for RTC, ``dn`` for uncalibrated digital numbers).
    :param scale: how asset values are scaled when an item does not say: ``db``, ``power`` (linear
        intensity), ``amplitude`` (linear, sqrt of power) or ``dn`` (digital numbers: calibrated with the
        item's calibration annotation when ``quantity`` is sigma0/beta0/gamma0, kept as they are when it
        is ``dn``). Empty (the default): not declared; the tiler decides from the data and records why,
        or fails the scene saying to set it (:func:`fusarbatch.tiling.scaling.detect_scale`).
    :param sign: href signer: empty for none, a built-in name (``planetary-computer``) or ``module:function``
        taking and returning an href string.
    :param timeout_s: seconds before a request to an API gives up.
    :param search_timeout_s: seconds before a whole search (all its pages; or the walk of a static catalog
        over HTTP) gives up: a server whose pages never end fails here, not never.
    :param max_search_mb: MiB that all answers of one search may hold together (one answer: at most
        :data:`~fusarbatch.catalog.search.MAX_RESPONSE_BYTES`).
    """

    name: str
    kind: Kind
    href: str
    collections: tuple[str, ...] = ()
    assets: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_ASSETS))
    quantity: Quantity = "sigma0"
    scale: Scale | Literal[""] = ""
    sign: str = ""
    timeout_s: float = 20.0
    search_timeout_s: float = 900.0
    max_search_mb: float = 1024.0
    description: str = ""

    def signer(self) -> Callable[[str], str] | None:
        """The href signer named by :attr:`sign`, imported on first use.

        :raises CatalogError: the signer's module is not installed or has no such function.
        """
        if not self.sign:
            return None
        target = BUILTIN_SIGNERS.get(self.sign, self.sign)
        module_name, _, func_name = target.partition(":")
        try:
            func = getattr(importlib.import_module(module_name), func_name)
        except (ImportError, AttributeError) as exc:
            raise CatalogError(
                f"catalog {self.name!r}: href signer {target!r} is not available ({exc}); "
                f"install its package (e.g. `pip install planetary-computer`) or remove `sign`"
            ) from None
        return func


def catalogs_dir() -> Path:
    """The directory holding the named catalogs (``*.toml``) and ``demo/``.

    ``$FUSARBATCH_CATALOGS`` wins; then the ``catalogs/`` folder of a source checkout; then the copy packed
    into an installed wheel (``fusarbatch/_catalogs``).
    """
    env = os.environ.get("FUSARBATCH_CATALOGS")
    if env:
        return Path(env)
    package = Path(__file__).resolve().parents[1]
    for candidate in (package.parent / "catalogs", package / "_catalogs"):
        if candidate.is_dir():
            return candidate
    return package.parent / "catalogs"


def named_catalogs() -> list[str]:
    """Names of the catalogs defined in :func:`catalogs_dir`, sorted."""
    return sorted(p.stem for p in catalogs_dir().glob("*.toml"))


_FIELDS = set(CatalogSpec.__dataclass_fields__)


def load_spec_file(path: Path) -> CatalogSpec:
    """Read one catalog definition; a relative ``href`` is taken relative to the TOML file.

    :raises CatalogError: unreadable TOML, an unknown key, or a value of the wrong kind; not a regular file
        (a FIFO or device is never opened) or larger than :data:`~fusarbatch.files.MAX_TOML_BYTES`.
    """
    try:
        text = read_capped(path, "catalog file", CatalogError, MAX_TOML_BYTES, "give a TOML file").decode()
        raw: dict[str, Any] = tomllib.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CatalogError(f"catalog file {path}: cannot read it ({exc}); fix the TOML") from None
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise CatalogError(
            f"catalog file {path}: unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(_FIELDS))}"
        )
    raw.setdefault("name", path.stem)
    types = {
        "name": str,
        "kind": str,
        "href": str,
        "sign": str,
        "description": str,
        "quantity": str,
        "scale": str,
    }
    for key, kind in types.items():
        if key in raw and not isinstance(raw[key], kind):
            raise CatalogError(f"catalog file {path}: `{key}` must be a string, got {raw[key]!r}")
    for key, unit in (("timeout_s", "seconds"), ("search_timeout_s", "seconds"), ("max_search_mb", "MiB")):
        if key in raw and (
            isinstance(raw[key], bool)
            or not isinstance(raw[key], int | float)
            or not 0 < raw[key] < float("inf")
        ):
            raise CatalogError(f"catalog file {path}: `{key}` must be a number of {unit} > 0")
    collections = raw.get("collections", [])
    if not isinstance(collections, list) or not all(isinstance(c, str) for c in collections):
        raise CatalogError(f"catalog file {path}: `collections` must be a list of strings")
    if "kind" not in raw or "href" not in raw:
        raise CatalogError(f"catalog file {path}: `kind` and `href` are required")
    if raw["kind"] not in ("api", "static", "geoparquet"):
        raise CatalogError(f"catalog file {path}: kind {raw['kind']!r} must be api, static or geoparquet")
    href = str(raw["href"])
    if "://" not in href and not Path(href).is_absolute():
        href = str((path.parent / href).resolve())
    raw["href"] = href
    raw["collections"] = tuple(raw.get("collections", ()))
    if "assets" in raw:
        assets = raw["assets"]
        if not isinstance(assets, dict):
            raise CatalogError(f"catalog file {path}: `assets` must be a table of polarisation = [keys]")
        raw["assets"] = {
            str(pol).upper(): (tuple(keys) if isinstance(keys, list) else (str(keys),))
            for pol, keys in assets.items()
        }
    for key, allowed in (("scale", Scale.__args__), ("quantity", Quantity.__args__)):
        if key in raw and raw[key] not in allowed:
            raise CatalogError(f"catalog file {path}: {key} {raw[key]!r} must be one of {', '.join(allowed)}")
    return CatalogSpec(**raw)


def resolve_catalog(value: str | None, *, collections: tuple[str, ...] = ()) -> CatalogSpec:
    """Turn a ``--catalog`` value (name, URL or path; ``None`` = ``demo``) into a :class:`CatalogSpec`.

    :param collections: overrides the spec's collections when given (``--collection``).
    :raises CatalogError: unknown name, missing path, or unrecognised file type (the message lists the
        known names); a catalog file that is not a regular file (FIFO, device).
    """
    value = value or "demo"
    named = catalogs_dir() / f"{value}.toml"
    if "/" not in value and "\\" not in value and named.is_file():
        spec = load_spec_file(named)
    elif value.startswith(("http://", "https://")):
        kind: Kind = "static" if value.endswith(".json") else "api"
        spec = CatalogSpec(name=value, kind=kind, href=value)
    else:
        path = Path(value).expanduser()
        if path.is_dir() and (path / "catalog.json").is_file():
            path = path / "catalog.json"
        if not path.exists():
            known = ", ".join(named_catalogs()) or "none"
            raise CatalogError(
                f"--catalog {value!r}: no such catalog name, URL or path; known names: {known}; "
                f"or give an http(s):// STAC API URL, a catalog.json or a stac-geoparquet file"
            )
        suffix = path.suffix.lower()
        if suffix in (".toml", ".parquet", ".geoparquet", ".json"):
            # a FIFO or device would block (or never end) the reader: refused before it is opened
            check_regular(path, "--catalog", CatalogError, "give a catalog.json, .parquet or .toml file")
        if suffix == ".toml":
            spec = load_spec_file(path)
        elif suffix in (".parquet", ".geoparquet"):
            spec = CatalogSpec(name=path.stem, kind="geoparquet", href=str(path.resolve()))
        elif suffix == ".json":
            spec = CatalogSpec(name=path.parent.name, kind="static", href=str(path.resolve()))
        else:
            raise CatalogError(
                f"--catalog {value!r}: not a catalog.json, .parquet or .toml file; give one of those"
            )
    if collections:
        spec = CatalogSpec(**{**spec.__dict__, "collections": tuple(collections)})
    timeout = http_timeout_override()
    if timeout is not None and "://" in spec.href:
        spec = CatalogSpec(**{**spec.__dict__, "timeout_s": timeout})
    return spec


def http_timeout_override() -> float | None:
    """Seconds from ``$FUSARBATCH_HTTP_TIMEOUT``, or ``None`` when it is unset or empty.

    :raises CatalogError: the variable is not a finite number of seconds > 0.
    """
    raw = os.environ.get("FUSARBATCH_HTTP_TIMEOUT", "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf")):
        raise CatalogError(
            f"FUSARBATCH_HTTP_TIMEOUT={raw!r}: expected a number of seconds > 0; fix or unset it"
        )
    return value
