"""Body of ``geoseg train``: train a model directory from a training config, or re-score one."""

from __future__ import annotations

import json
from pathlib import Path

import click


def run_train(
    config_path: str, steps: int | None, out: str | None, evaluate_only: bool, address: str | None, quiet: bool
) -> None:
    """Load the training config, train (or evaluate), print the held-out scores."""
    import logging

    from geoseg.core.contract import resolve
    from geoseg.train.config import load_train_config
    from geoseg.train.fit import summary_lines, train

    if not quiet:
        logging.getLogger("geoseg.train.fit").setLevel(logging.INFO)
    overrides = {"train": {"steps": steps}, "out": str(Path(out).resolve()) if out else None}
    cfg = load_train_config(config_path, overrides)
    contract = train(cfg, evaluate_only=evaluate_only, address=address)
    target = resolve(cfg.out, cfg.base_dir).resolve()
    for line in summary_lines(contract):
        click.echo(f"{cfg.name}: {line}")
    if evaluate_only:
        click.echo(json.dumps(contract["metrics"], indent=2))
    else:
        size = sum(f.stat().st_size for f in Path(target).iterdir())
        click.echo(f"{cfg.name}: wrote {target} ({size / 1e6:.2f} MB); load it with 'weights: {target}'")
