"""What a run did (``RunReport``: one entry per input, ok or failed) and its ``summary.csv``.

The scheduler fills it in, the driver returns it; a module of its own so that neither imports the other."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunReport:
    """What a run did: one entry per input, ok or failed."""

    summaries: list[dict[str, Any]] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (input, one-line error)
    tiles: int = 0
    skipped: int = 0  # inputs unchanged since they were done (their summaries are in ``summaries``)
    megapixels: float = 0.0
    seconds: float = 0.0
    started_unix: float = 0.0  # time.time() when run() began
    # (time.time(), core pixels) each time tile results reached their scene's writer
    progress: list[tuple[float, int]] = field(default_factory=list)
    writer_nodes: dict[str, str] = field(default_factory=dict)  # input -> Ray node id that assembled it
    device: str = ""  # where the models ran
    run_id: str = ""
    config_id: str = ""  # hash of the config and the models' versions (geoseg.outputs.records.config_fingerprint)
    legend: dict[str, dict[str, str]] = field(default_factory=dict)  # model -> class -> quicklook colour
    report_path: str = ""  # where report.html was written (geoseg.outputs.report)
    warnings: list[str] = field(default_factory=list)  # about the whole run, each logged once (e.g. imagery_warning)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def processed(self) -> int:
        """Inputs this run made outputs for."""
        return len(self.summaries) - self.skipped

    @property
    def first_tile_unix(self) -> float | None:
        return self.progress[0][0] if self.progress else None


def run_csv(report: RunReport) -> str:
    """``summary.csv``: a row per input x model x class, and a row per failed input."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        [
            "input",
            "status",
            "model",
            "task",
            "class",
            "count",
            "pixels",
            "area_m2",
            "cloud_cover",
            "cloud_shadow_cover",
            "error",
        ]
    )
    for s in report.summaries:
        cover = ["" if s.get(k) is None else s[k] for k in ("cloud_cover", "cloud_shadow_cover")]
        for model, m in s["models"].items():
            for cls, v in m["classes"].items():
                w.writerow(
                    [s["input"], "ok", model, m["task"], cls, v.get("count", ""), v["pixels"], v["area_m2"], *cover, ""]
                )
    for inp, err in report.failures:
        w.writerow([inp, "failed", "", "", "", "", "", "", "", "", err])
    return buf.getvalue()
