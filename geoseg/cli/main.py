"""The ``geoseg`` command: ``run``, ``synth`` and ``train``. Errors print one line on stderr and exit non-zero."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

import click

from geoseg import __version__
from geoseg.core.errors import GeosegError

# Package data (geoseg/defaults/: the wheel carries the config and its models); in a checkout a
# symlink to configs/default.yaml, whose model paths resolve against configs/.
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "defaults" / "configs" / "default.yaml"


@click.group()
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Errors (and the run's warnings) only, no progress bar.")
@click.version_option(__version__, prog_name="geoseg")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """geoseg: large GeoTIFFs -> land-use masks, object polygons and counts."""
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    ctx.obj = {"quiet": quiet}


@cli.command()
@click.argument("inputs", nargs=-1)
@click.option("--out", "out_dir", required=True, help="Output folder, or s3://bucket/prefix.")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML config (default: configs/default.yaml).",
)
@click.option("--tile-size", type=int, default=None, help="Core pixels per tile side (overrides the config).")
@click.option(
    "--halo", type=int, default=None, help="Pixels each side of a tile's core that its objects are decoded over."
)
@click.option(
    "--blend",
    type=click.Choice(["hann", "none"]),
    default=None,
    help="hann: models run on overlapping windows, blended (no seams); none: one window per tile.",
)
@click.option("--window", type=int, default=None, help="Window side the models see, in model pixels (blend hann).")
@click.option("--overlap", type=int, default=None, help="Model pixels shared by neighbouring windows (blend hann).")
@click.option(
    "--batch-size", type=int, default=None, help="Tiles per task (per network call on a GPU; one by one on the CPU)."
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None)
@click.option(
    "--precision",
    type=click.Choice(["auto", "bf16", "fp16", "fp32"]),
    default=None,
    help="Number format of the networks (auto: bf16 on CUDA and on CPUs with native bf16, else fp32).",
)
@click.option(
    "--vectors",
    default=None,
    metavar="FORMATS",
    help="Polygon formats, comma-separated: gpkg, parquet (default: the config's output.vectors, gpkg).",
)
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray).")
@click.option("--recursive", "-r", is_flag=True, help="Take rasters in sub-folders too (outputs mirror them).")
@click.option("--force", is_flag=True, help="Redo every input, even those unchanged since they were done.")
@click.option("--resume", is_flag=True, hidden=True, help="No effect: every run skips unchanged inputs.")
@click.option(
    "--stac-api", "stac_api", metavar="URL", default=None, help="Search this STAC API: every Item found is an input."
)
@click.option(
    "--collections",
    multiple=True,
    metavar="C1[,C2...]",
    help="Collections to search (--stac-api); comma-separated, or the flag repeated.",
)
@click.option("--bbox", type=float, nargs=4, default=None, metavar="W S E N", help="Search bbox, WGS84 degrees.")
@click.option("--datetime", "datetime_", metavar="RANGE", default=None, help="Search datetime: 2026-01-01/.. etc.")
@click.option("--query", metavar="JSON", default=None, help="Search query (STAC API query extension), as JSON.")
@click.option("--filter", "filter_", metavar="CQL2-JSON", default=None, help="Search filter in CQL2-JSON.")
@click.option("--max-items", type=int, default=None, help="At most this many Items from the search.")
@click.pass_context
def run(
    ctx: click.Context,
    inputs: tuple[str, ...],
    out_dir: str,
    config_path: str | None,
    tile_size: int | None,
    halo: int | None,
    blend: str | None,
    window: int | None,
    overlap: int | None,
    batch_size: int | None,
    device: str | None,
    precision: str | None,
    vectors: str | None,
    address: str | None,
    recursive: bool,
    force: bool,
    resume: bool,
    stac_api: str | None,
    collections: tuple[str, ...],
    bbox: tuple[float, float, float, float] | None,
    datetime_: str | None,
    query: str | None,
    filter_: str | None,
    max_items: int | None,
) -> None:
    """Segment every GeoTIFF in INPUTS (files, folders, globs, s3:// prefixes, STAC Items) and every
    Item a STAC API search finds (--stac-api, or the config's stac_api: section) into OUT.

    Inputs done before from the same bytes with the same config and models are skipped (see
    OUT/run-manifest.json); new and changed ones are processed. Each input writes OUT/<name>/,
    where <name> is its path below the folder given (scenes/a/x.tif -> OUT/a/x/), or a STAC
    Item's id.

    \b
    Examples:
      geoseg run scenes/ --out out/                # nightly: only new or changed scenes
      geoseg run scenes/ --out out/ --recursive    # scenes/**/*.tif, mirrored under out/
      geoseg run 'scenes/2026-*/*.tif' --out out/  # a glob (quoted: geoseg expands it)
      geoseg run scenes/ --out out/ --force        # redo everything
      geoseg run a.tif b.tif --out out/ --config configs/default.yaml --tile-size 1024
      geoseg run scenes/ --out out/ --vectors gpkg,parquet   # GeoParquet files too
      geoseg run /vsis3/bucket/scene.tif --out out/ --address ray://head:10001
      geoseg run s3://bucket/scenes/ --out s3://bucket/results   # AWS_* variables: docs/cluster.md
      geoseg run --stac-api https://stac.example/v1 --collections sentinel-2-l2a --bbox 8.7 44.3 9.0 44.5 \\
          --datetime 2026-01-01/.. --out out/ --config configs/sentinel2-clouds.yaml
    """
    from geoseg.core.config import load_config
    from geoseg.core.storage import OutputStore
    from geoseg.runner.pipeline import run as run_pipeline

    overrides: dict[str, dict[str, Any]] = {
        "tiling": {"tile_size": tile_size, "halo": halo, "blend": blend, "window": window, "overlap": overlap},
        "runtime": {"batch_size": batch_size, "device": device, "precision": precision},
        "output": {"vectors": vectors},
        "stac_api": {
            "url": stac_api,
            "collections": list(collections) or None,
            "bbox": list(bbox) if bbox else None,
            "datetime": datetime_,
            "query": query,
            "filter": filter_,
            "max_items": max_items,
        },
    }
    config = load_config(config_path or DEFAULT_CONFIG, overrides)
    if not inputs and config.stac_api is None:
        raise click.UsageError("no inputs: give INPUTS, or a STAC API search (--stac-api URL --collections C)")
    del resume  # kept so that old nightly scripts still run: skipping unchanged inputs is the default
    report = run_pipeline(
        list(inputs), out_dir, config, address=address, progress=not ctx.obj["quiet"], force=force, recursive=recursive
    )
    for path, error in report.failures:
        click.echo(f"error: {error}" if path in error else f"error: {path}: {error}", err=True)
    if ctx.obj["quiet"]:  # -q hides the log; a warning that the results may be wrong still shows
        for warning in report.warnings:
            click.echo(f"warning: {warning}", err=True)
    click.echo(
        f"{report.processed} processed, {report.skipped} unchanged (skipped), {len(report.failures)} failed; "
        f"{report.tiles} tiles, {report.megapixels:.1f} Mpx in {report.seconds:.1f} s -> "
        f"{OutputStore(out_dir).uri('summary.csv')}"
    )
    click.echo(f"report: {report.report_path or OutputStore(out_dir).uri('report.html')}")
    if not report.ok:
        sys.exit(1)


@cli.command()
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--size", type=int, default=2048, show_default=True, help="Width and height in pixels.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--crs", default="EPSG:32618", show_default=True, help="EPSG:4326 gives a geographic grid.")
@click.option("--pixel-size", type=float, default=None, help="CRS units per pixel (default 1 m, or 1e-5 deg).")
@click.option("--touching-pairs", type=int, default=0, help="Pairs of buildings sharing a wall.")
def synth(out: str, size: int, seed: int, crs: str, pixel_size: float | None, touching_pairs: int) -> None:
    """Write a synthetic scene OUT with exact truth in OUT's '.truth' folder.

    \b
    Example:
      geoseg synth scenes/synth.tif --size 4096 --seed 7
    """
    from geoseg.train.synth import write_scene

    if pixel_size is None:
        pixel_size = 1e-5 if crs.upper() == "EPSG:4326" else 1.0
    objects = write_scene(out, size=size, seed=seed, crs=crs, pixel_size=pixel_size, touching_pairs=touching_pairs)
    kinds = {k: sum(o.kind == k for o in objects) for k in ("building", "ship")}
    click.echo(
        f"{out}: {size}x{size}, {kinds['building']} buildings, {kinds['ship']} ships; "
        f"truth in {Path(out).with_suffix('.truth')}/"
    )


@cli.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False, exists=True))
@click.option("--steps", type=int, default=None, help="Optimizer steps (overrides the config's train.steps).")
@click.option("--out", default=None, help="Model directory to write (overrides the config's 'out').")
@click.option(
    "--evaluate",
    "evaluate_only",
    is_flag=True,
    help="Do not train: score the existing model directory on the held-out split.",
)
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray).")
@click.pass_context
def train(
    ctx: click.Context, config_path: str, steps: int | None, out: str | None, evaluate_only: bool, address: str | None
) -> None:
    """Train a model from GeoTIFFs and labels into a directory that 'geoseg run' loads.

    \b
    Examples:
      geoseg train configs/train/synth-landuse.yaml
      geoseg train configs/train/synth-buildings.yaml --steps 20 --out /tmp/quick
      geoseg train configs/train/synth-ships.yaml --evaluate   # re-score models/synth-ships
    """
    from geoseg.cli.train import run_train

    run_train(config_path, steps, out, evaluate_only, address, ctx.obj["quiet"])


def main() -> None:
    """Console entry point: GeosegError -> one line on stderr, exit 2."""
    try:
        cli(standalone_mode=False)
    except GeosegError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


def command() -> None:
    """The installed ``geoseg`` command: ``main``, then an exit without the interpreter's teardown.

    Once ``main`` is done and the exit handlers have run (the local Ray stopped and its session
    folder removed, logging flushed), the process holds nothing the OS does not release; Python's
    own teardown of the ~1,200 modules a run imports took 0.3-0.4 s here, a twentieth of a run on a
    small image. An exception ``main`` does not handle, or a thread still running, exits as usual.
    """
    code: str | int | None = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    if code is None:
        code = 0
    elif not isinstance(code, int):  # as the interpreter treats sys.exit("message")
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader that went away, a closed stream
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    command()
