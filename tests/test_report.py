"""The run report (``out/report.html``) and the scenes' quicklooks (``<stem>_quicklook.png``).

One run of three synthetic scenes and a bad input: each scene publishes a quicklook whose pixels
are its masks blended over its stretched image (checked against the exact truth); the report
lists every scene with its quicklook, counts and areas, charts them, and lists the failed input
with its error; a real browser (Debian's headless Chromium) renders it and shows every scene. An
incremental rerun's report still shows the scenes it skipped or was not given. Quicklooks of the
36000 x 36000 ESA WorldCover tile are made with the memory of a small raster's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import rasterio
from PIL import Image

from geoseg.core.config import load_config
from geoseg.outputs.quicklook import INSTANCE_FILL_ALPHA, LANDUSE_ALPHA, Overlay, legend, outlines, render
from geoseg.runner.pipeline import run
from geoseg.runner.writer import WRITER_GDAL_CACHE_MB  # the scene writers make the quicklooks under this cache
from geoseg.train.synth import LANDUSE_CLASSES, LANDUSE_COLORS, write_scene

REPO = Path(__file__).resolve().parents[1]
SCENES = {"alpha": 1, "beta & gamma": 2, "delta": 3}  # stem -> seed; '&' and ' ' test escaping and URLs
BAD = "bad <1>.tif"  # not a raster; '<' tests escaping
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SIZE = 384


@pytest.fixture(scope="module")
def report_run(ray_session, tmp_path_factory, oracle_config_path):
    root = tmp_path_factory.mktemp("report")
    inputs = root / "in"
    inputs.mkdir()
    for stem, seed in SCENES.items():
        write_scene(inputs / f"{stem}.tif", size=SIZE, seed=seed)
    (inputs / BAD).write_text("station,lat,lon\nA,38.9,-77.0\n")
    config = load_config(oracle_config_path, {"tiling": {"tile_size": 256, "halo": 16}})
    paths = [str(inputs / f"{stem}.tif") for stem in SCENES] + [str(inputs / BAD)]
    report = run(paths, root / "out", config, progress=False)
    return report, inputs, root / "out", config


class _Page(HTMLParser):
    """What a test needs of the page: scene cards' names, images, failed rows, svg bars, scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.images: list[dict[str, str]] = []
        self.failed: list[list[str]] = []
        self.bars = 0
        self.svgs = 0
        self.scripts = 0
        self.urls: list[str] = []
        self._stack: list[tuple[str, dict[str, str]]] = []
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if tag in ("img", "a", "link", "script", "iframe", "source"):
            self.urls += [a[k] for k in ("src", "href") if k in a]
        if tag == "img":
            self.images.append(a)
        elif tag == "script":
            self.scripts += 1
        elif tag == "svg":
            self.svgs += 1
        elif tag == "rect" and "bar" in a.get("class", ""):
            self.bars += 1
        elif tag == "table" and "failed" in a.get("class", ""):
            self._stack.append(("failed", a))
        elif tag == "tr" and self._stack and self._stack[-1][0] == "failed":
            self.failed.append([])
        elif tag == "td" and self._stack and self._stack[-1][0] == "failed":
            self._text = []
        elif tag == "h3" and "name" in a.get("class", ""):
            self._stack.append(("name", a))
            self._text = []

    def handle_endtag(self, tag):
        if tag == "td" and self._stack and self._stack[-1][0] == "failed":
            self.failed[-1].append("".join(self._text))
        elif tag == "table" and self._stack and self._stack[-1][0] == "failed":
            self._stack.pop()
        elif tag == "h3" and self._stack and self._stack[-1][0] == "name":
            self._stack.pop()
            self.names.append("".join(self._text))

    def handle_data(self, data):
        self._text.append(data)


def _parse(html_text: str) -> _Page:
    page = _Page()
    page.feed(html_text)
    return page


def _rgba(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGBA"))


def _colors(hexes: list[str]) -> np.ndarray:
    return np.array([[int(h[i : i + 2], 16) for i in (1, 3, 5)] for h in hexes], dtype=np.float64)


# -- quicklooks


def test_every_scene_publishes_its_quicklook(report_run):
    report, _, out, _ = report_run
    assert [Path(p).name for p, _ in report.failures] == [BAD]
    assert sorted(Path(s["input"]).stem for s in report.summaries) == sorted(SCENES)
    for stem in SCENES:
        folder = out / stem
        name = f"{stem}_quicklook.png"
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["quicklook"] == name
        assert name in json.loads((folder / "manifest.json").read_text())["files"]
        assert _rgba(folder / name).shape == (SIZE, SIZE, 4)  # never larger than the raster


def test_quicklook_is_the_masks_over_the_image(report_run):
    """Pixel for pixel (no decimation at 384 px): land use blended in its class colours over the
    stretched image, object outlines in their model's colour, the image's nodata transparent."""
    _, inputs, out, config = report_run
    stem = "alpha"
    colors = legend(config)  # the QGIS styles' colours: the config's, else geoseg.outputs.styles' palette
    assert [colors["landuse"][c] for c in LANDUSE_CLASSES] == LANDUSE_COLORS
    assert len({colors["buildings"]["building"], colors["ships"]["ship"]}) == 2
    scene = inputs / f"{stem}.tif"
    got = _rgba(out / stem / f"{stem}_quicklook.png").astype(np.float64)
    image = render(str(scene), [])[..., :3].astype(np.float64)  # the stretched image alone
    with rasterio.open(scene.with_suffix(".truth") / "landuse.tif") as t:
        truth = t.read(1)
    with rasterio.open(scene) as src:
        valid = src.read_masks(1) > 0
    ids = {}
    for model in ("buildings", "ships"):
        with rasterio.open(out / stem / f"{stem}_{model}.tif") as m:
            ids[model] = m.read(1)
    assert ids["buildings"].any() and ids["ships"].any()
    np.testing.assert_array_equal(got[..., 3] > 0, valid)

    landuse_only = valid & (truth != 255) & (ids["buildings"] == 0) & (ids["ships"] == 0)
    palette = _colors(LANDUSE_COLORS)
    want = image * (1 - LANDUSE_ALPHA) + palette[np.where(landuse_only, truth, 0)] * LANDUSE_ALPHA
    err = np.abs(got[..., :3] - want).max(axis=-1)[landuse_only]
    assert landuse_only.sum() > 0.8 * SIZE * SIZE and err.max() <= 1.0, err.max()

    for model, cls in (("buildings", "building"), ("ships", "ship")):
        color = colors[model][cls]
        edge = outlines(ids[model]) & valid
        assert edge.any()
        np.testing.assert_array_equal(got[edge][:, :3], np.repeat(_colors([color]), edge.sum(), axis=0))
        inner = (ids[model] > 0) & ~edge & valid & (truth != 255)
        lu = image * (1 - LANDUSE_ALPHA) + palette[np.where(inner, truth, 0)] * LANDUSE_ALPHA
        want = lu * (1 - INSTANCE_FILL_ALPHA) + _colors([color])[0] * INSTANCE_FILL_ALPHA
        assert np.abs(got[inner][:, :3] - want[inner]).max() <= 1.5


def test_decimated_quicklook_keeps_class_proportions(report_run):
    """At a quarter of the size, each land-use class covers the share of the quicklook it has
    of the scene (the colour under the blend recovered from the stretched image)."""
    _, inputs, out, _ = report_run
    stem = "delta"
    scene = inputs / f"{stem}.tif"
    small = render(
        str(scene),
        [Overlay(str(out / stem / f"{stem}_landuse.tif"), "semantic", tuple(LANDUSE_COLORS))],
        size=SIZE // 4,
    ).astype(np.float64)
    image = render(str(scene), [], size=SIZE // 4).astype(np.float64)
    assert small.shape == (SIZE // 4, SIZE // 4, 4)
    shown = small[..., 3] > 0
    overlay = (small[..., :3] - image[..., :3] * (1 - LANDUSE_ALPHA)) / LANDUSE_ALPHA
    palette = _colors(LANDUSE_COLORS)
    cls = np.argmin(((overlay[:, :, None, :] - palette[None, None]) ** 2).sum(-1), axis=-1)[shown]
    with rasterio.open(scene.with_suffix(".truth") / "landuse.tif") as t:
        truth = t.read(1)
    truth = truth[truth != 255]
    for k in range(len(LANDUSE_CLASSES)):
        assert abs((cls == k).mean() - (truth == k).mean()) < 0.03, (
            LANDUSE_CLASSES[k],
            (cls == k).mean(),
            (truth == k).mean(),
        )


# -- the report page


def test_report_lists_scenes_chart_failures_and_throughput(report_run):
    report, inputs, out, _ = report_run
    assert report.report_path == str(out / "report.html")
    text = (out / "report.html").read_text()
    page = _parse(text)
    assert sorted(page.names) == sorted(SCENES)
    assert page.scripts == 0 and not [u for u in page.urls if not u.startswith("./")]  # no script, no network
    for stem in SCENES:
        [img] = [i for i in page.images if i["alt"] == f"quicklook of {stem}"]
        assert (out / unquote(img["src"])).is_file()
        assert (int(img["width"]), int(img["height"])) == (SIZE, SIZE)
    [row] = page.failed[1:]  # the header row first
    assert row[0] == str(inputs / BAD) and "not a readable raster" in row[1] and row[1].startswith(str(inputs / BAD))
    assert "&lt;1&gt;" in text and "<1>" not in text  # the input's name, escaped
    assert page.svgs == 3  # one chart per model
    n_bars = sum(
        1 for s in report.summaries for m in s["models"].values() for v in m["classes"].values() if v["area_m2"] > 0
    )
    assert page.bars == n_bars
    for s in report.summaries:  # every class area of every scene, in hectares
        for v in s["models"]["landuse"]["classes"].values():
            assert f"{v['area_m2'] / 1e4:,.2f}" in text
    rate = report.megapixels / report.seconds
    assert f"{rate:,.2f} Mpx/s" in text and report.run_id in text


def test_no_scene_takes_the_report_name():
    from geoseg.raster.discover import output_name

    assert output_name("report.html.tif") == "report.html_" and output_name("a/report.html.tif") == "a/report.html"


def _chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    profile = cwd / "chromium-profile"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--mute-audio",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=cwd)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
def test_report_renders_in_headless_chromium(report_run, tmp_path):
    """The page as a browser builds it shows every scene with its quicklook and the failed input;
    the screenshot holds the quicklooks' pixels, so every image loaded."""
    report, inputs, out, _ = report_run
    # A copy of the folder elsewhere: the page needs nothing but its own folder.
    copy = tmp_path / "copied out"
    shutil.copytree(out, copy)
    url = (copy / "report.html").as_uri()
    dom = _chromium("--virtual-time-budget=5000", "--dump-dom", url, cwd=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = _parse(dom.stdout)
    assert sorted(page.names) == sorted(SCENES), dom.stdout[:2000]
    assert len([i for i in page.images if i.get("class") == "quicklook"]) == len(SCENES)
    assert [r for r in page.failed if r and r[0] == str(inputs / BAD) and "not a readable raster" in r[1]]

    shot = tmp_path / "shot.png"
    res = _chromium("--window-size=1600,3000", "--virtual-time-budget=5000", f"--screenshot={shot}", url, cwd=tmp_path)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    screen = _rgba(shot)[..., :3]

    def hist(rgb: np.ndarray) -> np.ndarray:
        q = (rgb // 32).astype(np.int64)
        return np.bincount((q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2]).ravel(), minlength=512)

    # The quicklooks' colours (opaque pixels) must all be on screen: at 1:1 with all three loaded
    # nearly all of their pixel counts are found; a missing image would take its third away.
    wanted = np.zeros(512, dtype=np.int64)
    for stem in SCENES:
        ql = _rgba(copy / stem / f"{stem}_quicklook.png")
        wanted += hist(ql[..., :3][ql[..., 3] == 255])
    found = np.minimum(hist(screen), wanted).sum() / wanted.sum()
    assert found > 0.9, found


def test_rerun_report_shows_skipped_and_earlier_scenes(report_run):
    """A rerun given one unchanged input (no cluster started) still reports every scene in the folder."""
    _, inputs, out, config = report_run
    again = run([str(inputs / "alpha.tif")], out, config, progress=False)
    assert again.ok and again.skipped == 1 and again.processed == 0
    page = _parse((out / "report.html").read_text())
    assert sorted(page.names) == sorted(SCENES)
    assert page.failed == []
    text = (out / "report.html").read_text()
    assert "unchanged, skipped" in text and text.count("from an earlier run") == 2


# -- memory


# The child's own peak (VmHWM: its memory since exec; ru_maxrss would count the forked parent's).
_PEAK = textwrap.dedent("""
    import sys
    from geoseg.outputs.quicklook import Overlay, write_quicklook
    image, out = sys.argv[1], sys.argv[2]
    write_quicklook(out, image, [Overlay(image, "semantic")])  # the tile as image and as land use
    status = open("/proc/self/status").read()
    print(int(status.split("VmHWM:")[1].split()[0]) * 1024)
""")


def _peak_rss(image: Path, out: Path) -> int:
    res = subprocess.run(
        [sys.executable, "-c", _PEAK, str(image), str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "GDAL_CACHEMAX": str(WRITER_GDAL_CACHE_MB)},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return int(res.stdout.split()[-1])


def test_worldcover_quicklook_memory_is_flat(shared_data, tmp_path):
    """The 36000 x 36000 WorldCover tile (1.3 GB of pixels), with its overviews and without them
    (read through a VRT that hides them: GDAL then decimates from the full-resolution blocks),
    makes its quicklook in the memory of a 2048 x 2048 crop of it (300 times fewer pixels)."""
    tile = shared_data / "esa_worldcover" / "ESA_WorldCover_10m_2021_v200_N00E006_Map.tif"
    if not tile.is_file():
        pytest.skip(f"{tile} not found")
    with rasterio.open(tile) as src:
        assert (src.width, src.height) == (36000, 36000) and src.overviews(1)
        window = rasterio.windows.Window(5500, 31000, 2048, 2048)  # a quicklook of the same 1024 x 1024
        profile = {**src.profile, "width": 2048, "height": 2048, "transform": src.window_transform(window)}
        crop = src.read(1, window=window)
        colormap = src.colormap(1)
    small = tmp_path / "crop.tif"
    with rasterio.open(small, "w", **profile) as dst:
        dst.write(crop, 1)
        dst.write_colormap(1, colormap)
    no_overviews = tmp_path / "no_overviews.vrt"
    no_overviews.write_text(_vrt_without_overviews(tile, colormap))
    with rasterio.open(no_overviews) as vrt:
        assert vrt.overviews(1) == [] and vrt.shape == (36000, 36000)

    base = _peak_rss(small, tmp_path / "small.png")
    big = _peak_rss(tile, tmp_path / "tile.png")
    raw = _peak_rss(no_overviews, tmp_path / "raw.png")
    ql = _rgba(tmp_path / "tile.png")
    assert ql.shape[:2] == (1024, 1024)
    with rasterio.open(tile) as src:  # nodata (the open sea) transparent, the land-cover classes shown
        nodata_share = (src.read(1, out_shape=(1024, 1024)) == 0).mean()
    assert abs((ql[..., 3] == 0).mean() - nodata_share) < 0.01 and 0.05 < nodata_share < 0.95
    assert len(np.unique(ql[ql[..., 3] > 0][:, :3], axis=0)) >= 5
    from_raw = _rgba(tmp_path / "raw.png")
    assert abs((from_raw[..., 3] == 0).mean() - nodata_share) < 0.01
    print(
        f"peak RSS: crop {base / 2**20:.0f} MB, tile {big / 2**20:.0f} MB, tile without overviews {raw / 2**20:.0f} MB"
    )
    for peak in (big, raw):
        assert peak < 400 * 1024**2, (peak, base)  # the pixels alone would be 1296 MB
        assert peak < 1.5 * base, (peak, base)


def _vrt_without_overviews(tile: Path, colormap: dict) -> str:
    entries = "".join(f'<Entry c1="{r}" c2="{g}" c3="{b}" c4="{a}"/>' for _, (r, g, b, a) in sorted(colormap.items()))
    with rasterio.open(tile) as src:
        t = src.transform
        return textwrap.dedent(f"""\
            <VRTDataset rasterXSize="{src.width}" rasterYSize="{src.height}">
              <SRS>{src.crs.to_wkt()}</SRS>
              <GeoTransform>{t.c}, {t.a}, {t.b}, {t.f}, {t.d}, {t.e}</GeoTransform>
              <VRTRasterBand dataType="Byte" band="1">
                <NoDataValue>{src.nodata:g}</NoDataValue>
                <ColorInterp>Palette</ColorInterp>
                <ColorTable>{entries}</ColorTable>
                <SimpleSource>
                  <SourceFilename relativeToVRT="0">{tile}</SourceFilename>
                  <OpenOptions><OOI key="OVERVIEW_LEVEL">NONE</OOI></OpenOptions>
                  <SourceBand>1</SourceBand>
                </SimpleSource>
              </VRTRasterBand>
            </VRTDataset>""")
