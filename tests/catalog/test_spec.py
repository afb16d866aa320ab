"""resolve_catalog: names, URLs, paths, the HTTP timeout override, and one-line errors."""

from __future__ import annotations

import pytest
from conftest import DEMO_CATALOG, DEMO_DIR

from fusarbatch.catalog.spec import load_spec_file, named_catalogs, resolve_catalog
from fusarbatch.errors import CatalogError


@pytest.fixture(autouse=True)
def _no_overrides(monkeypatch):
    monkeypatch.delenv("FUSARBATCH_HTTP_TIMEOUT", raising=False)
    monkeypatch.delenv("FUSARBATCH_CATALOGS", raising=False)


def test_default_is_the_embedded_demo():
    spec = resolve_catalog(None)
    assert spec.name == "demo"
    assert spec.kind == "static"
    assert spec.href == str(DEMO_CATALOG.resolve())
    assert spec.collections == ("fusarbatch-demo-s1",)
    assert spec.assets == {"VV": ("vv",), "VH": ("vh",)}


def test_named_api_catalogs():
    assert named_catalogs() == ["demo", "earth-search", "planetary-computer"]
    es = resolve_catalog("earth-search")
    assert (es.kind, es.href, es.collections) == (
        "api",
        "https://earth-search.aws.element84.com/v1",
        ("sentinel-1-grd",),
    )
    assert es.timeout_s == 20.0
    pc = resolve_catalog("planetary-computer")
    assert (pc.quantity, pc.scale, pc.sign) == ("gamma0", "power", "planetary-computer")


@pytest.mark.parametrize(
    ("value", "kind"),
    [("http://127.0.0.1:9/stac", "api"), ("https://example.org/catalog.json", "static")],
)
def test_urls(value, kind):
    spec = resolve_catalog(value)
    assert (spec.kind, spec.href, spec.name) == (kind, value, value)


def test_folder_and_parquet_paths(tmp_path):
    spec = resolve_catalog(str(DEMO_DIR))
    assert (spec.kind, spec.href) == ("static", str(DEMO_CATALOG.resolve()))
    parquet = tmp_path / "generated_scenes.parquet"
    parquet.write_bytes(b"")
    spec = resolve_catalog(str(parquet))
    assert (spec.kind, spec.href, spec.name) == ("geoparquet", str(parquet.resolve()), "generated_scenes")


def test_collections_override():
    assert resolve_catalog("demo", collections=("a", "b")).collections == ("a", "b")


def test_unknown_name_lists_known_names():
    with pytest.raises(CatalogError) as info:
        resolve_catalog("sentinel-hub")
    message = str(info.value)
    assert message.startswith("--catalog 'sentinel-hub': no such catalog name, URL or path")
    assert "known names: demo, earth-search, planetary-computer" in message
    assert "\n" not in message and info.value.exit_code == 2


def test_http_timeout_env_overrides_http_catalogs_only(monkeypatch):
    monkeypatch.setenv("FUSARBATCH_HTTP_TIMEOUT", "1.5")
    assert resolve_catalog("http://127.0.0.1:9/").timeout_s == 1.5
    assert resolve_catalog("earth-search").timeout_s == 1.5
    assert resolve_catalog("demo").timeout_s == 20.0  # a local static catalog makes no HTTP request


@pytest.mark.parametrize("bad", ["abc", "0", "-3", "inf", "nan"])
def test_http_timeout_env_must_be_positive_seconds(monkeypatch, bad):
    monkeypatch.setenv("FUSARBATCH_HTTP_TIMEOUT", bad)
    with pytest.raises(
        CatalogError, match=rf"^FUSARBATCH_HTTP_TIMEOUT='{bad}': expected a number of seconds > 0"
    ):
        resolve_catalog("http://127.0.0.1:9/")


def test_toml_unknown_key_is_named(tmp_path):
    path = tmp_path / "generated.toml"
    path.write_text('kind = "api"\nhref = "http://x"\nurl = "oops"\n')
    with pytest.raises(CatalogError, match=r"unknown key 'url'"):
        load_spec_file(path)


def test_toml_relative_href_is_relative_to_the_file(tmp_path):
    path = tmp_path / "generated.toml"
    path.write_text('kind = "static"\nhref = "sub/catalog.json"\n[assets]\nvv = "VV"\n')
    spec = load_spec_file(path)
    assert spec.href == str((tmp_path / "sub" / "catalog.json").resolve())
    assert spec.name == "generated"
    assert spec.assets == {"VV": ("VV",)}
