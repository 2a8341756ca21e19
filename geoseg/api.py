"""``geoseg.run``: the pipeline from Python (a notebook, a script), with the command's defaults.

import geoseg
report = geoseg.run("scenes/", "out/")                      # the default config and models
report = geoseg.run(["a.tif", "b.tif"], "out/", "configs/synthetic-oracle.yaml", tile_size=1024)
outputs = geoseg.open_run("out/")                           # geoseg.results.RunOutputs
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from pydantic import BaseModel, ValidationError

from geoseg.core.config import Config, config_from_dict, load_config
from geoseg.core.errors import ConfigError

if TYPE_CHECKING:
    from geoseg.runner.pipeline import RunReport

# The config `geoseg run` uses without --config (package data; in a checkout, configs/default.yaml).
DEFAULT_CONFIG = Path(__file__).resolve().parent / "defaults" / "configs" / "default.yaml"
# Sections of a config whose keys ``run`` takes as keywords: tiling, runtime, output.
_SECTIONS = {
    name: f.annotation
    for name, f in Config.model_fields.items()
    if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
}

PathLike = Union[str, Path]


def run(
    inputs: PathLike | list[PathLike],
    out: PathLike,
    config: PathLike | dict[str, Any] | Config | None = None,
    *,
    address: str | None = None,
    progress: bool = True,
    force: bool = False,
    recursive: bool = False,
    **overrides: Any,
) -> RunReport:
    """Segment ``inputs`` (a file, folder, glob or ``s3://`` prefix, or a list of them) into ``out``.

    ``config``: a YAML path, a mapping as in the YAML (relative paths resolve against the current
    folder), a ``Config``, or None for the default config and models. Keyword ``overrides`` set
    keys of the config's sections (``tiling``, ``runtime``, ...), e.g. ``tile_size=1024,
    batch_size=4, device="cpu"``, as the command's flags do. Returns
    the ``RunReport`` (``.summaries``, ``.failures``, ``.warnings``); read the outputs with
    ``geoseg.open_run(out)``. Like the command, a run skips inputs unchanged since they were done.
    """
    from geoseg.runner.pipeline import run as run_pipeline

    paths = [str(p) for p in inputs] if isinstance(inputs, (list, tuple)) else [str(inputs)]
    return run_pipeline(
        paths,
        out,
        with_overrides(resolve_config(config), overrides),
        address=address,
        progress=progress,
        force=force,
        recursive=recursive,
    )


def resolve_config(config: PathLike | dict[str, Any] | Config | None) -> Config:
    """A ``Config`` from what ``run`` accepts."""
    if config is None:
        return load_config(DEFAULT_CONFIG)
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return config_from_dict(config, "<config dict>", str(Path.cwd()))
    return load_config(config)


def with_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """``config`` with section keys (``tiling``, ``runtime``, ...) replaced; an unknown or bad key is a ConfigError."""
    updates: dict[str, Any] = {}
    for section, model in _SECTIONS.items():
        given = {k: v for k, v in overrides.items() if k in model.model_fields}
        if given:
            try:
                updates[section] = model.model_validate({**getattr(config, section).model_dump(), **given})
            except ValidationError as exc:
                err = exc.errors()[0]
                raise ConfigError(
                    "geoseg.run", ".".join([section, *map(str, err["loc"])]), err["msg"].removeprefix("Value error, ")
                ) from None
    unknown = sorted(set(overrides) - {k for m in _SECTIONS.values() for k in m.model_fields})
    if unknown:
        known = ", ".join(k for m in _SECTIONS.values() for k in m.model_fields)
        raise ConfigError("geoseg.run", unknown[0], f"not a setting of {', '.join(_SECTIONS)} (those are: {known})")
    return config.model_copy(update=updates) if updates else config
