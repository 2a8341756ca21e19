"""Which inputs a run takes, and the output folder each one gets.

Inputs are files, folders (``--recursive`` descends), shell-style globs (``scenes/**/*.tif``) and
``s3://bucket/prefix/`` prefixes; ``.tif``/``.tiff`` in any case. Each input's output folder
mirrors its path relative to what was named on the command line (``scenes/a/x.tif`` from
``scenes/`` -> ``out/a/x/``), so equal file names in different folders never collide.

Every part of an output name is made safe here, once: no part can be empty, ``.`` or ``..``,
start with a dot (hidden files, staging folders, the lock), or equal one of the run's own files at
the top of ``--out`` (``summary.csv``, ``run-manifest.json``, ``report.html``, ``runs/``); so no
input can write outside its own folder or replace a run file. Spaces and non-ASCII letters are kept as they are.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from geoseg.core.errors import InputError
from geoseg.core.s3 import RASTER_SUFFIXES, file_fingerprint, is_s3, list_rasters
from geoseg.raster.stac_input import is_stac, item_fingerprint, read_items

# Names the run itself writes at the top of --out (see geoseg.outputs.records); a scene may not take them.
RUN_FILES = frozenset({"summary.csv", "run-manifest.json", "runs", "collection.json", "report.html"})
TRUTH_SUFFIX = ".truth"  # `geoseg synth` writes a scene's exact truth in a folder beside it
_GLOB_MAGIC = re.compile(r"[*?[]")
_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


@dataclass(frozen=True)
class FoundInput:
    """One raster to process and the output folder (relative to ``--out``, POSIX) it writes."""

    path: str
    name: str


def is_raster_name(name: str) -> bool:
    return name.lower().endswith(RASTER_SUFFIXES)


def safe_part(part: str) -> str:
    """One folder or file name that stays inside its parent and is not hidden."""
    part = _UNSAFE_CHARS.sub("_", part)
    stripped = part.lstrip(".")
    if stripped != part or not part:  # "", ".", "..", ".hidden": dots become underscores
        part = "_" * (len(part) - len(stripped)) + stripped if part else "_"
    return part


def output_name(relative: str) -> str:
    """The output folder for an input at ``relative`` (POSIX, with its raster suffix) under what
    was named on the command line: suffix dropped, each part made safe, run files avoided."""
    parts = [p for p in PurePosixPath(relative).parts if p not in ("", "/")]
    if not parts:
        parts = ["_"]
    leaf = parts[-1]
    for suffix in RASTER_SUFFIXES:
        if leaf.lower().endswith(suffix):
            leaf = leaf[: -len(suffix)]
            break
    parts[-1] = leaf
    safe = [safe_part(p) for p in parts]
    if safe[0].lower() in RUN_FILES:
        safe[0] += "_"
    return "/".join(safe)


def clashes(a: str, b: str) -> bool:
    """True when output folders ``a`` and ``b`` are the same or one holds the other."""
    a_parts, b_parts = a.split("/"), b.split("/")
    n = min(len(a_parts), len(b_parts))
    return a_parts[:n] == b_parts[:n]


def find_inputs(
    items: list[str],
    recursive: bool = False,
    exclude: str | Path | None = None,
) -> tuple[list[FoundInput], list[InputError]]:
    """Expand the command line's inputs into rasters with their output names; an item that yields
    nothing is an error of its own (the others go on). ``exclude`` (the output folder) is never
    searched, so a run over a folder that holds its own outputs does not take its masks as inputs."""
    found: list[FoundInput] = []
    errors: list[InputError] = []
    skip = Path(exclude).resolve() if exclude is not None and not is_s3(exclude) else None
    for item in items:
        try:
            if is_stac(item):
                found.extend(FoundInput(path, output_name(safe_part(it.id))) for path, it in read_items(item))
            elif is_s3(item):
                found.extend(_from_s3(item, recursive))
            elif os.path.isdir(item):
                found.extend(_from_folder(Path(item), recursive, skip))
            elif os.path.exists(item) or item.startswith("/vsi") or "://" in item:
                found.append(FoundInput(item, output_name(PurePosixPath(item.replace("\\", "/")).name)))
            elif _GLOB_MAGIC.search(item):
                found.extend(_from_glob(item, skip))
            else:
                raise InputError(item, "no such file or directory")
        except InputError as exc:
            errors.append(exc)
    return found, errors


def _from_s3(item: str, recursive: bool) -> list[FoundInput]:
    if not item.endswith("/") and is_raster_name(item):  # one object
        return [FoundInput(item, output_name(item.rsplit("/", 1)[-1]))]
    item = item.rstrip("/") + "/"  # a prefix, with or without its trailing slash
    if _GLOB_MAGIC.search(item):
        raise InputError(item, "globs are not supported in s3:// locations; give the prefix (and --recursive)")
    objects = list_rasters(item, recursive=recursive)
    if not objects:
        raise InputError(item, "prefix holds no .tif/.tiff objects" + ("" if recursive else " (try --recursive)"))
    return [FoundInput(uri, output_name(uri[len(item) :])) for uri in objects]


def _from_folder(folder: Path, recursive: bool, skip: Path | None) -> list[FoundInput]:
    files: list[Path] = []
    if recursive:
        for root, dirs, names in os.walk(folder):
            # Not inputs: hidden folders (staging areas, .git), `geoseg synth`'s truth folders and the
            # output folder itself.
            dirs[:] = sorted(
                d
                for d in dirs
                if not d.startswith(".")
                and not d.endswith(TRUTH_SUFFIX)
                and (skip is None or Path(root, d).resolve() != skip)
            )
            files.extend(Path(root, n) for n in names if is_raster_name(n))
    else:
        files = [f for f in folder.iterdir() if is_raster_name(f.name) and f.is_file()]
    if not files:
        where = "or below it " if recursive else ""
        raise InputError(
            str(folder), f"directory {where}holds no .tif/.tiff files" + ("" if recursive else " (try --recursive)")
        )
    return [FoundInput(str(f), output_name(f.relative_to(folder).as_posix())) for f in sorted(files)]


def _from_glob(pattern: str, skip: Path | None) -> list[FoundInput]:
    # The output name is the match's path below the pattern's fixed leading folders.
    parts = Path(pattern).parts
    fixed = next(i for i, p in enumerate(parts) if _GLOB_MAGIC.search(p))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    matches = [Path(m) for m in glob.glob(pattern, recursive=True) if is_raster_name(m) and os.path.isfile(m)]
    matches = [m for m in matches if not any(p.endswith(TRUTH_SUFFIX) for p in m.relative_to(root).parts[:-1])]
    if skip is not None:
        matches = [m for m in matches if skip not in m.resolve().parents]
    if not matches:
        raise InputError(pattern, "no .tif/.tiff file matches this pattern")
    return [FoundInput(str(m), output_name(m.relative_to(root).as_posix())) for m in sorted(matches)]


def input_fingerprint(path: str) -> dict[str, Any] | None:
    """What identifies an input's content without reading pixels: a file's size and mtime, an S3
    object's size and ETag, a STAC Item's ``updated`` time and its assets' fingerprints; None where
    none is known (the input is then always processed)."""
    if is_stac(path):
        return item_fingerprint(path)
    return file_fingerprint(path)
