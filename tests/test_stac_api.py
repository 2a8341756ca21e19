"""Nightly runs over a real STAC API: stac-fastapi-pgstac on pgstac (PostgreSQL 15 + PostGIS), started
by the tests on 127.0.0.1 (``helpers.pgstac``), holding Items the tests write with pystac over
256 x 256 crops of the sen2ships band files; ``geoseg run --stac-api`` with the Sentinel-2 cloud
config runs every Item the search finds, skips them on a rerun, runs a new or updated one, and
stops before any work when the API is down or answers an error."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

import pystac
import pytest
import rasterio
import yaml
from click.testing import CliRunner
from helpers.outputs import assert_same_scene
from helpers.stac_items import band_item
from rasterio.windows import Window

from geoseg.cli.main import cli, main
from geoseg.core.config import StacApiConfig, load_config
from geoseg.core.errors import ConfigError
from geoseg.outputs.records import config_fingerprint
from geoseg.raster.discover import input_fingerprint
from geoseg.raster.stac_search import search_inputs, search_items

REPO = Path(__file__).resolve().parents[1]
CLOUDS = REPO / "configs" / "sentinel2-clouds.yaml"
COLLECTION = "sen2ships-crops"
CROP = 256
MEDITERRANEAN = ["-10", "30", "20", "47"]  # W S E N: Genoa, Marseille and Algiers; not Gdynia (54.5 N)
YEAR_2023 = "2023-01-01T00:00:00Z/2023-12-31T23:59:59Z"
UPDATED = "2024-01-01T00:00:00Z"


def _crop(src: Path, dst: Path) -> Path:
    """The central CROP x CROP pixels of a band file (runs stay fast; the grid is what matters)."""
    with rasterio.open(src) as ds:
        window = Window((ds.width - CROP) // 2, (ds.height - CROP) // 2, CROP, CROP)
        profile = {
            "driver": "GTiff",
            "width": CROP,
            "height": CROP,
            "count": 1,
            "dtype": ds.dtypes[0],
            "crs": ds.crs,
            "transform": ds.window_transform(window),
            "nodata": ds.nodata,
        }
        data = ds.read(1, window=window)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(dst, "w", **profile) as out:
        out.write(data, 1)
    return dst


@pytest.fixture(scope="module")
def items(shared_data, tmp_path_factory) -> dict[str, pystac.Item]:
    """Items of four ports' cropped bands, plus Genoa's bands again as an Item acquired in 2020; each
    saved as a JSON file too (the same Items given to geoseg directly). Their assets are ``file://``
    URIs, as an API serving files of a shared file system gives them."""
    pytest.importorskip("ukis_csmask")
    from helpers.sentinel2 import BANDS, band_files

    folder = tmp_path_factory.mktemp("api-items")
    files = {
        port: {band: _crop(f, folder / port / f"{band}.tif") for band, f in zip(BANDS, band_files(shared_data, port))}
        for port in ("genoa", "algiers", "marseille", "gdynia")
    }
    found = {port: band_item(folder, port, bands) for port, bands in files.items()}
    found["genoa_2020"] = band_item(
        folder, "genoa_2020", files["genoa"], when=datetime(2020, 7, 10, 10, 30, tzinfo=timezone.utc)
    )
    for item in found.values():
        for asset in item.assets.values():  # absolute: a path alone would be a path on the API's host
            asset.href = Path(asset.href).as_uri()
        item.collection_id = COLLECTION
        item.properties["updated"] = UPDATED
        item.save_object(include_self_link=True)
    return found


def _record(item: pystac.Item) -> dict:
    """The Item as the API stores it: its collection named, no links (the API makes its own)."""
    return {**item.to_dict(include_self_link=False), "links": [], "collection": COLLECTION}


@pytest.fixture(scope="module")
def api(stac_api_server, items):
    """The session's STAC API with the collection and every Item but Marseille's (added by the test)."""
    extent = pystac.Extent(pystac.SpatialExtent([[-180, -90, 180, 90]]), pystac.TemporalExtent([[None, None]]))
    collection = pystac.Collection(COLLECTION, "256 x 256 crops of sen2ships bands", extent, license="other")
    stac_api_server.load_collection(collection.to_dict(include_self_link=False))
    stac_api_server.load_items([_record(items[p]) for p in ("genoa", "algiers", "gdynia", "genoa_2020")])
    return stac_api_server


def _item_url(api, item_id: str) -> str:
    return f"{api.url}/collections/{COLLECTION}/items/{item_id}"


def _geoseg_run(config: Path, *args: str) -> str:
    """``geoseg -q run ARGS --config CONFIG`` in this process (the session's Ray); its stdout."""
    result = CliRunner().invoke(cli, ["-q", "run", *args, "--config", str(config)])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def _saved_search(folder: Path, api) -> Path:
    """sentinel2-clouds.yaml with a ``stac_api:`` section: the search the nightly job runs."""
    config = yaml.safe_load(CLOUDS.read_text())
    config["stac_api"] = {
        "url": api.url,
        "collections": [COLLECTION],
        "bbox": [float(v) for v in MEDITERRANEAN],
        "datetime": YEAR_2023,
    }
    path = folder / "s2-search.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _processed(out: Path) -> list[str]:
    """The inputs the last run in ``out`` processed (its record in runs/)."""
    last = max((out / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    return json.loads(last.read_text())["processed"]


def test_nightly_runs_over_a_stac_api(ray_session, api, items, tmp_path):
    """First run: every Item in the bbox and datetime range (not Gdynia, outside the bbox, nor
    Genoa's 2020 Item); second: none; after a new Item is added: that one only; an updated Item no
    longer matches its outputs. The search is a config's (as jobs/nightly.sh runs it) or the flags'.
    The outputs equal those of a run on the same Items' JSON files, and link to the Items' URLs."""
    out = tmp_path / "out"
    saved = _saved_search(tmp_path, api)
    first = _geoseg_run(saved, "--out", str(out))
    assert first.startswith("2 processed, 0 unchanged (skipped), 0 failed"), first
    assert sorted(p.name for p in out.iterdir() if (p / "manifest.json").exists()) == ["algiers", "genoa"]
    assert sorted(_processed(out)) == [_item_url(api, "algiers"), _item_url(api, "genoa")]
    stac_out = json.loads((out / "genoa" / "genoa.stac.json").read_text())
    assert [link["href"] for link in stac_out["links"] if link["rel"] == "derived_from"] == [_item_url(api, "genoa")]
    assert stac_out["properties"]["geoseg:input"] == _item_url(api, "genoa")

    flags = ["--stac-api", api.url, "--collections", COLLECTION, "--bbox", *MEDITERRANEAN, "--datetime", YEAR_2023]
    again = _geoseg_run(saved, *flags, "--out", str(out))
    assert again.startswith("0 processed, 2 unchanged (skipped), 0 failed"), again

    api.load_items([_record(items["marseille"])])  # a new Item
    third = _geoseg_run(saved, "--out", str(out))
    assert third.startswith("1 processed, 2 unchanged (skipped), 0 failed"), third
    assert _processed(out) == [_item_url(api, "marseille")]

    # An updated Item: the API gives its new `updated` time, so its fingerprint is no longer the one
    # its outputs were made from and the next run redoes it (that rule's own test:
    # test_stac_inputs.py::test_items_done_are_skipped_and_an_updated_item_is_redone).
    updated = items["genoa"].clone()
    updated.properties["updated"] = "2024-02-01T00:00:00Z"
    api.load_items([_record(updated)])
    config = StacApiConfig(url=api.url, collections=[COLLECTION], bbox=[float(v) for v in MEDITERRANEAN])
    assert _item_url(api, "genoa") in search_inputs(config)
    done = json.loads((out / "genoa" / "summary.json").read_text())["fingerprint"]
    now = input_fingerprint(_item_url(api, "genoa"))
    assert now == {**done, "updated": "2024-02-01T00:00:00Z"} and done["updated"] == UPDATED

    ports = ("genoa", "algiers", "marseille")
    direct = tmp_path / "direct"
    _geoseg_run(CLOUDS, *(str(items[p].get_self_href()) for p in ports), "--out", str(direct))
    for port in ports:
        assert_same_scene(out / port, direct / port, port, {"clouds": "semantic"})


def test_search_filter_and_max_items(api):
    """The search's CQL2-JSON filter and max_items reach the API (no run: the search alone); a
    datetime pystac-client cannot read is a config error."""
    only_genoa = StacApiConfig(
        url=api.url,
        collections=[COLLECTION],
        filter={"op": "=", "args": [{"property": "id"}, "genoa"]},
    )
    assert [url for url, _item in search_items(only_genoa)] == [_item_url(api, "genoa")]
    one = StacApiConfig(url=api.url, collections=[COLLECTION], max_items=1)
    assert len(search_items(one)) == 1
    with pytest.raises(ConfigError, match="bad search: invalid datetime component: yesterday"):
        search_items(StacApiConfig(url=api.url, collections=[COLLECTION], datetime="yesterday"))


class _Answers500(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        body = json.dumps({"code": "InternalServerError", "description": "database is down"}).encode()
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def answers_500():
    """An HTTP server on 127.0.0.1 that answers every request with a 500; its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answers500)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.parametrize("answer", ["HTTP 500", "closed port"])
def test_an_api_down_or_in_error_fails_before_any_work(answer, answers_500, tmp_path, monkeypatch, capsys):
    """One line naming the URL and the status or the connection error, exit status 2 (as for a bad
    config), and nothing in the output folder touched: no run record, no lock, no scene."""
    from helpers.pgstac import free_port

    url = answers_500 if answer == "HTTP 500" else f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "out"
    (out / "scene").mkdir(parents=True)
    (out / "scene" / "manifest.json").write_text("{}")
    (out / "run-manifest.json").write_text('{"inputs": {}}')
    before = _snapshot(out)
    args = ["geoseg", "run", "--stac-api", url, "--collections", COLLECTION, "--out", str(out)]
    monkeypatch.setattr(sys, "argv", [*args, "--config", str(CLOUDS)])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1, err
    if answer == "HTTP 500":
        assert err.strip() == f"error: STAC API {url}: HTTP 500 Internal Server Error (database is down)"
    else:
        assert err.strip().startswith(f"error: STAC API {url}: cannot connect: [Errno 111]"), err
    assert _snapshot(out) == before


def test_flags_override_the_saved_search(tmp_path):
    """A config's stac_api: keys are the search; a flag replaces its key, the others stay."""
    path = tmp_path / "search.yaml"
    path.write_text(
        CLOUDS.read_text() + "stac_api: {url: 'http://127.0.0.1:9/v1', collections: [a, b], max_items: 5}\n"
    )
    saved = load_config(path).stac_api
    assert saved is not None and (saved.url, saved.collections, saved.max_items) == (
        "http://127.0.0.1:9/v1",
        ["a", "b"],
        5,
    )
    flags = {"stac_api": {"collections": ["c"], "datetime": "2026-01-01/..", "filter": '{"op": "=", "args": [1, 1]}'}}
    over = load_config(path, flags).stac_api
    assert over is not None and (over.url, over.collections, over.datetime, over.max_items) == (
        "http://127.0.0.1:9/v1",
        ["c"],
        "2026-01-01/..",
        5,
    )
    assert over.filter == {"op": "=", "args": [1, 1]}
    # The search chooses inputs: it is no part of the settings fingerprint (changing it redoes nothing).
    plain = tmp_path / "plain.yaml"
    plain.write_text(CLOUDS.read_text())
    assert config_fingerprint(load_config(path)) == config_fingerprint(load_config(plain))


def test_search_flags_are_checked_like_the_config(tmp_path, monkeypatch, capsys):
    """A search without --collections, or with both --query and --filter: one line naming the flags."""
    for flags, expected in (
        (["--stac-api", "http://127.0.0.1:9"], "error: --collections: Field required"),
        (
            ["--stac-api", "http://127.0.0.1:9", "--collections", "c", "--query", "{}", "--filter", "{}"],
            "error: --stac-api, --collections, --query, --filter: give query or filter, not both",
        ),
    ):
        monkeypatch.setattr(sys, "argv", ["geoseg", "run", *flags, "--out", str(tmp_path / "out")])
        with pytest.raises(SystemExit) as exc:
            main()
        assert exc.value.code == 2 and capsys.readouterr().err.strip() == expected
    assert not (tmp_path / "out").exists()
