"""``out/report.html``: one static page a person opens after a run.

Self-contained: inline CSS and SVG, no script, nothing fetched from the network. Images and files
are linked by relative paths (``./<name>/<stem>_quicklook.png``), so the page keeps working when
the output folder is copied or downloaded from object storage. It shows the run (its id, time,
device, counts, throughput), the inputs that failed with their errors, a chart of area per class
across scenes, and per scene its quicklook and its counts and areas per class: every scene
published in the folder, those this run made, those it skipped as unchanged and those of earlier
runs whose inputs it was not given.
"""

from __future__ import annotations

import html
import time
from typing import Any
from urllib.parse import quote

from geoseg.core.storage import OutputStore
from geoseg.outputs.quicklook import QUICKLOOK_SIZE, quicklook_shape
from geoseg.outputs.records import input_key, read_json

REPORT_FILE = "report.html"
_FALLBACK_COLORS = ["#1f78b4", "#33a02c", "#e31a1c", "#ff7f00", "#6a3d9a", "#b15928", "#a6cee3", "#b2df8a"]

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#f4f5f7}
header{background:#1d2330;color:#fff}
header>div,main{max-width:1400px;margin:0 auto;padding:16px 24px}
header h1{margin:0 0 4px;font-size:22px}
header .meta{color:#c9d1e0;margin:0 0 12px}
.stats{display:flex;flex-wrap:wrap;gap:8px;margin:0;padding:0;list-style:none}
.stats li{background:#2c3446;border-radius:6px;padding:6px 12px}
.stats b{display:block;font-size:18px}
.stats .bad b{color:#ff8a80}
h2{font-size:18px;margin:24px 0 8px}
table{border-collapse:collapse;background:#fff}
th,td{padding:3px 8px;border-bottom:1px solid #e3e6eb;text-align:left;vertical-align:top}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.failed td.error{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;color:#a3161a}
.none{color:#5b6473}
.chart{background:#fff;border-radius:6px;padding:8px 12px;margin-bottom:12px;overflow-x:auto}
.chart h3{margin:4px 0;font-size:15px}
.scenes{display:grid;grid-template-columns:repeat(auto-fill,minmax(440px,1fr));gap:16px}
.scene{background:#fff;border-radius:6px;padding:12px;box-shadow:0 1px 2px rgba(0,0,0,.08);min-width:0}
.scene h3{margin:0 0 4px;font-size:16px;word-break:break-all}
.scene .meta{color:#5b6473;margin:0 0 8px;font-size:12px;word-break:break-all}
.scene img{display:block;max-width:100%;height:auto;background:#dfe3e8;margin-bottom:8px}
.scene .missing{background:#eef0f3;color:#5b6473;padding:24px;text-align:center}
.scene table{width:100%;font-size:13px}
.swatch{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:6px;vertical-align:-1px;border:1px solid rgba(0,0,0,.25)}
.files{font-size:12px;margin:8px 0 0}
.files a{margin-right:10px}
.tag{display:inline-block;font-size:11px;border-radius:3px;padding:0 5px;background:#e3e6eb;color:#1d2330}
.tag.new{background:#d7f0dc}
.tag.old{background:#fdebd0}
.warn,.warnings{color:#8a5300}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _href(*parts: str) -> str:
    """A relative URL to a file under the output folder (each part percent-encoded, '/' kept)."""
    return "./" + "/".join(quote(p, safe="/") for p in parts)


def _utc(unix: float | None) -> str:
    if not unix:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix))


def _ha(m2: float) -> str:
    return f"{m2 / 1e4:,.2f}"


def collect_scenes(store: OutputStore, report: Any, manifest: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every published scene of the folder: this run's summaries (made or skipped) and, from the
    run manifest, those of earlier runs; each with ``_origin`` ('new', 'unchanged', 'earlier')."""
    scenes: dict[str, dict[str, Any]] = {}
    for summary in report.summaries:
        origin = "new" if summary.get("run") == report.run_id else "unchanged"
        scenes[input_key(str(summary.get("input")))] = {**summary, "_origin": origin}
    for key, entry in manifest.items():
        folder = entry.get("output")
        if key in scenes or not folder:
            continue
        summary = read_json(store, f"{folder}/summary.json")
        if summary is not None and input_key(str(summary.get("input"))) == key:
            scenes[key] = {**summary, "_origin": "earlier"}
    return sorted(scenes.values(), key=lambda s: (str(s.get("output")), str(s.get("input"))))


def _colors(report: Any, scenes: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """model -> class -> colour: the run's config (``report.legend``), else a fixed palette."""
    colors: dict[str, dict[str, str]] = {m: dict(c) for m, c in (getattr(report, "legend", None) or {}).items()}
    for s in scenes:
        for model, m in (s.get("models") or {}).items():
            known = colors.setdefault(model, {})
            for cls in m.get("classes", {}):
                known.setdefault(cls, _FALLBACK_COLORS[len(known) % len(_FALLBACK_COLORS)])
    return colors


def _swatch(color: str) -> str:
    return f'<span class="swatch" style="background:{_e(color)}"></span>'


def _header(report: Any, scenes: list[dict[str, Any]]) -> str:
    failed = len(report.failures)
    rate = report.megapixels / report.seconds if report.seconds > 0 else 0.0
    stats = [
        ("processed", report.processed, ""),
        ("unchanged (skipped)", report.skipped, ""),
        ("failed", failed, "bad" if failed else ""),
        ("scenes in folder", len(scenes), ""),
        ("tiles", report.tiles, ""),
        ("megapixels", f"{report.megapixels:,.1f}", ""),
        ("seconds", f"{report.seconds:,.1f}", ""),
        ("throughput", f"{rate:,.2f} Mpx/s", ""),
    ]
    items = "".join(f'<li class="{c}"><b>{_e(v)}</b>{_e(k)}</li>' for k, v, c in stats)
    meta = (
        f"run {_e(report.run_id)} &middot; started {_e(_utc(report.started_unix))} &middot; "
        f"device {_e(report.device or '-')} &middot; config {_e(getattr(report, 'config_id', '') or '-')}"
    )
    return (
        f'<header><div><h1>geoseg run report</h1><p class="meta">{meta}</p>'
        f'<ul class="stats">{items}</ul></div></header>'
    )


def _warnings(report: Any) -> str:
    warnings = list(getattr(report, "warnings", None) or [])
    if not warnings:
        return ""
    items = "".join(f"<li>{_e(w)}</li>" for w in warnings)
    return f'<section id="warnings"><h2>Warnings</h2><ul class="warnings">{items}</ul></section>'


def _failures(report: Any) -> str:
    if not report.failures:
        return '<section id="failed"><h2>Failed inputs</h2><p class="none">None.</p></section>'
    rows = "".join(
        f'<tr><td class="input">{_e(p)}</td><td class="error">{_e(err)}</td></tr>' for p, err in report.failures
    )
    return (
        f'<section id="failed"><h2>Failed inputs ({len(report.failures)})</h2>'
        f'<table class="failed"><thead><tr><th>input</th><th>error</th></tr></thead>'
        f"<tbody>{rows}</tbody></table></section>"
    )


def _unit(max_m2: float) -> tuple[str, float]:
    if max_m2 >= 1e7:
        return "km²", 1e6
    if max_m2 >= 1e4:
        return "ha", 1e4
    return "m²", 1.0


def _chart(model: str, task: str, scenes: list[dict[str, Any]], colors: dict[str, str]) -> str:
    """A horizontal stacked bar per scene: the area of each class (SVG, with a title per bar)."""
    rows = [(str(s.get("output")), s["models"][model]["classes"]) for s in scenes if model in (s.get("models") or {})]
    classes = list(colors) + [c for _, cl in rows for c in cl if c not in colors]
    totals = [sum(float(v.get("area_m2") or 0) for v in cl.values()) for _, cl in rows]
    top = max(totals, default=0.0)
    unit, div = _unit(top)
    label_w, bar_w, row_h, pad = 230, 520, 22, 8
    legend_h = 24
    width = label_w + bar_w + 110
    height = legend_h + len(rows) * row_h + 30
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="area per class of {_e(model)}" '
        f'font-family="system-ui,sans-serif" font-size="12">'
    ]
    x = label_w
    for cls in classes:  # legend
        color = colors.get(cls, "#888888")
        parts.append(
            f'<rect x="{x}" y="6" width="11" height="11" fill="{_e(color)}" stroke="#0004"/>'
            f'<text x="{x + 15}" y="16">{_e(cls)}</text>'
        )
        x += 22 + 7 * len(cls)
    scale = bar_w / top if top > 0 else 0.0
    for i, ((name, cl), total) in enumerate(zip(rows, totals)):
        y = legend_h + i * row_h
        short = name if len(name) <= 34 else "…" + name[-33:]
        parts.append(
            f'<text x="{label_w - pad}" y="{y + 15}" text-anchor="end"><title>{_e(name)}</title>{_e(short)}</text>'
        )
        x0 = float(label_w)
        for cls in classes:
            area = float((cl.get(cls) or {}).get("area_m2") or 0)
            if area <= 0:
                continue
            w = area * scale
            parts.append(
                f'<rect class="bar" x="{x0:.2f}" y="{y + 3}" width="{max(w, 0.5):.2f}" height="{row_h - 6}" '
                f'fill="{_e(colors.get(cls, "#888888"))}"><title>{_e(name)} · {_e(cls)}: '
                f"{area / div:,.2f} {unit}</title></rect>"
            )
            x0 += w
        parts.append(f'<text x="{x0 + 6:.2f}" y="{y + 15}" fill="#5b6473">{total / div:,.1f} {unit}</text>')
    axis_y = legend_h + len(rows) * row_h + 4
    parts.append(f'<line x1="{label_w}" y1="{axis_y}" x2="{label_w + bar_w}" y2="{axis_y}" stroke="#8a93a3"/>')
    for frac in (0.0, 0.5, 1.0):
        tx = label_w + bar_w * frac
        parts.append(
            f'<line x1="{tx:.1f}" y1="{axis_y}" x2="{tx:.1f}" y2="{axis_y + 4}" stroke="#8a93a3"/>'
            f'<text x="{tx:.1f}" y="{axis_y + 17}" text-anchor="middle" fill="#5b6473">'
            f"{top * frac / div:,.1f}</text>"
        )
    parts.append("</svg>")
    kind = "land use" if task == "semantic" else "objects"
    return f'<div class="chart"><h3>{_e(model)} ({kind}): area per class, {unit}</h3>{"".join(parts)}</div>'


def _charts(scenes: list[dict[str, Any]], colors: dict[str, dict[str, str]]) -> str:
    models: dict[str, str] = {}
    for s in scenes:
        for model, m in (s.get("models") or {}).items():
            models.setdefault(model, str(m.get("task", "")))
    if not models:
        return '<section id="chart"><h2>Area per class across scenes</h2><p class="none">No scenes.</p></section>'
    body = "".join(_chart(model, task, scenes, colors.get(model, {})) for model, task in models.items())
    return f'<section id="chart"><h2>Area per class across scenes</h2>{body}</section>'


_ORIGIN = {
    "new": ("new", "made by this run"),
    "unchanged": ("", "unchanged, skipped"),
    "earlier": ("old", "from an earlier run"),
}


EAGER_IMAGES = 12  # quicklooks loaded with the page; those further down load as they are scrolled to


def _card(index: int, s: dict[str, Any], colors: dict[str, dict[str, str]]) -> str:
    folder = str(s.get("output") or "")
    stem = folder.rsplit("/", 1)[-1]
    cls_name, origin = _ORIGIN.get(s.get("_origin", ""), ("", ""))
    if s.get("_origin") != "new" and s.get("run"):
        origin += f" (run {s['run']})"
    width, height = int(s.get("width") or 0), int(s.get("height") or 0)
    meta = (
        f"{_e(s.get('input'))}<br>{width} × {height} px &middot; {_e(s.get('crs', ''))} &middot; "
        f"{_e(s.get('tiles', '-'))} tiles &middot; {_e(s.get('seconds', '-'))} s "
        f'<span class="tag {cls_name}">{_e(origin)}</span>'
    )
    if s.get("cloud_cover") is not None:
        shadow = s.get("cloud_shadow_cover")
        meta += (
            f"<br>cloud cover {float(s['cloud_cover']):.1f} %"
            + ("" if shadow is None else f", cloud shadow {float(shadow):.1f} %")
            + " of valid pixels"
        )
    for warning in s.get("warnings") or []:
        meta += f'<br><span class="warn">{_e(warning)}</span>'
    quicklook = s.get("quicklook")
    if quicklook:
        rows, cols = quicklook_shape(width, height, QUICKLOOK_SIZE) if width and height else (0, 0)
        size = f' width="{cols}" height="{rows}"' if rows else ""
        src = _href(folder, str(quicklook))
        lazy = ' loading="lazy"' if index >= EAGER_IMAGES else ""
        picture = (
            f'<a href="{_e(src)}"><img class="quicklook" src="{_e(src)}"{size} '
            f'alt="quicklook of {_e(folder)}"{lazy}></a>'
        )
    else:
        why = s.get("quicklook_error") or "made before quicklooks existed"
        picture = f'<p class="missing">no quicklook ({_e(why)})</p>'
    valid = int(s.get("valid_pixels") or 0)
    body = []
    for model, m in (s.get("models") or {}).items():
        for cls, v in m.get("classes", {}).items():
            color = colors.get(model, {}).get(cls, "#888888")
            count = v.get("count")
            share = f"{100.0 * int(v.get('pixels') or 0) / valid:.1f} %" if valid else "-"
            body.append(
                f"<tr><td>{_e(model)}</td><td>{_swatch(color)}{_e(cls)}</td>"
                f'<td class="num">{"" if count is None else f"{int(count):,}"}</td>'
                f'<td class="num">{_ha(float(v.get("area_m2") or 0))}</td><td class="num">{share}</td></tr>'
            )
    table = (
        '<table class="classes"><thead><tr><th>model</th><th>class</th><th class="num">count</th>'
        '<th class="num">area (ha)</th><th class="num">of valid pixels</th></tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )
    files = [(f"{stem}_{model}.tif", f"{model} mask") for model in (s.get("models") or {})]
    files += [(f"{stem}.gpkg", "polygons"), ("summary.json", "summary")]
    links = "".join(f'<a href="{_e(_href(folder, name))}">{_e(label)}</a>' for name, label in files)
    return (
        f'<article class="scene" id="scene-{index}"><h3 class="name">{_e(folder)}</h3>'
        f'<p class="meta">{meta}</p>{picture}{table}<p class="files">{links}</p></article>'
    )


def render_report(report: Any, scenes: list[dict[str, Any]]) -> str:
    """The page's HTML for a run (``geoseg.runner.pipeline.RunReport``) and the folder's scenes."""
    colors = _colors(report, scenes)
    cards = "".join(_card(i, s, colors) for i, s in enumerate(scenes))
    scenes_html = (
        f'<section id="scenes"><h2>Scenes ({len(scenes)})</h2><div class="scenes">{cards}</div></section>'
        if scenes
        else '<section id="scenes"><h2>Scenes</h2><p class="none">No scene published yet.</p></section>'
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>geoseg run {_e(report.run_id)}</title><style>{_CSS}</style></head><body>"
        f"{_header(report, scenes)}<main>{_warnings(report)}{_failures(report)}"
        f"{_charts(scenes, colors)}{scenes_html}</main>"
        "</body></html>\n"
    )


def write_report(store: OutputStore, report: Any, manifest: dict[str, dict[str, Any]]) -> str:
    """Write ``report.html`` at the top of the output folder; returns where it is."""
    page = render_report(report, collect_scenes(store, report, manifest))
    # ASCII with character references: the same bytes whatever the locale's encoding
    store.write_text(REPORT_FILE, page.encode("ascii", "xmlcharrefreplace").decode("ascii"))
    return store.uri(REPORT_FILE)
