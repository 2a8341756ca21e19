"""Outputs, on disk or in S3 (or any S3 API), published a scene at a time (``OutputStore``).

A scene's files are written into a local staging folder and published as a whole. A scene counts as
published only once its ``manifest.json`` exists: on disk the folder is renamed into place; on S3
the old manifest is deleted first and the new one put last, so a reader never takes a
half-replaced scene for a complete one. Paths and credentials for S3: ``geoseg.core.s3``.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from geoseg.core.checkpoint import STAMP_FILE, TILES_DIR, stamp_matches, write_stamp
from geoseg.core.errors import OutputError
from geoseg.core.s3 import boto_errors, error_reason, is_missing, is_s3, s3_client, split_uri

MANIFEST = "manifest.json"
# --------------------------------------------------------------------------- outputs


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _scene_files(staging: Path) -> dict[str, Path]:
    """The files of a staging folder by relative POSIX name (the manifest itself excluded)."""
    files = {p.relative_to(staging).as_posix(): p for p in sorted(staging.rglob("*")) if p.is_file()}
    files.pop(MANIFEST, None)
    return files


def _manifest(files: dict[str, Path]) -> str:
    data = {
        "files": {name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for name, p in files.items()},
        "published": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return json.dumps(data, indent=2)


def _flat(name: str) -> str:
    """A scene folder name as one path part (for staging folders beside the outputs)."""
    return name.replace("%", "%25").replace("/", "%2F")


def _content_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


class OutputStore:
    """Where a run's outputs go: a local (or shared) folder, or s3://bucket/prefix."""

    def __init__(self, location: str | Path) -> None:
        self.location: str = str(location)
        self.remote: bool = is_s3(self.location)
        if self.remote:
            self._bucket, self._prefix = split_uri(self.location)
            if not self._bucket:
                raise OutputError(self.location, "no bucket in the S3 location")
            self._s3: Any = None
        else:
            self._dir = Path(location)

    def __repr__(self) -> str:
        return f"OutputStore({self.location!r})"

    def __getstate__(self) -> dict[str, Any]:
        # Shipped to the scene writers: a boto3 client does not pickle; each process makes its own.
        return {**self.__dict__, "_s3": None} if self.remote else dict(self.__dict__)

    # -- helpers
    @property
    def _client(self) -> Any:
        if self._s3 is None:
            self._s3 = s3_client()
        return self._s3

    def _key(self, relpath: str) -> str:
        return "/".join(part for part in (self._prefix, relpath.strip("/")) if part)

    def uri(self, relpath: str = "") -> str:
        """Where ``relpath`` lives, for messages: ``out/scene/x.tif`` or ``s3://bkt/out/scene/x.tif``."""
        relpath = relpath.strip("/")
        if self.remote:
            key = self._key(relpath)
            return f"s3://{self._bucket}/{key}" if key else f"s3://{self._bucket}"
        return os.path.join(self.location, relpath) if relpath else self.location

    # -- checks
    def check_writable(self) -> None:
        """Fail before any work when outputs could not be written (raises OutputError, one line)."""
        if not self.remote:
            try:
                self._dir.mkdir(parents=True, exist_ok=True)
                probe = self._dir / f".geoseg-write-test-{os.getpid()}"
                probe.write_text("")
                probe.unlink()
            except OSError as exc:
                raise OutputError(self.location, f"output folder is not writable ({exc.strerror or exc})") from None
            return
        # A probe object rather than HeadBucket: a writer may lack s3:ListBucket; publishing needs
        # put and delete. A missing bucket answers NoSuchBucket to the put.
        probe_key = self._key(f".geoseg-write-test-{os.getpid()}")
        try:
            self._client.put_object(Bucket=self._bucket, Key=probe_key, Body=b"")
            self._client.delete_object(Bucket=self._bucket, Key=probe_key)
        except boto_errors() as exc:
            raise OutputError(self.location, error_reason(exc)) from None

    # -- scenes
    def staging_path(self, name: str) -> Path | None:
        """Where scene folder ``name`` is staged on disk beside the outputs (None for S3)."""
        return None if self.remote else self._dir / f".{_flat(name)}.partial"

    def staging_dir(self, name: str, checkpoint: dict[str, Any] | None = None) -> Path:
        """An empty local folder for the files of scene folder ``name`` (beside the outputs when
        they are on disk, so publishing is a rename; in the temp folder when they go to S3).

        With ``checkpoint`` (a stamp, see ``geoseg.core.checkpoint``) on a local store, tile checkpoints
        already there under the same stamp are kept (everything else goes) and new ones may be added.
        """
        staging = self.staging_path(name)
        if staging is None:
            return Path(tempfile.mkdtemp(prefix=f"geoseg-{_flat(name)}-"))
        if checkpoint is not None and stamp_matches(staging, checkpoint):
            for entry in staging.iterdir():
                if entry.is_dir() and entry.name != TILES_DIR:
                    shutil.rmtree(entry)
                elif entry.is_file() and entry.name != STAMP_FILE:
                    entry.unlink()
            return staging
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        if checkpoint is not None:
            write_stamp(staging, checkpoint)
        return staging

    def publish(self, staging: Path, name: str) -> None:
        """Make a completed scene visible as folder ``name`` (e.g. ``a/scene``), replacing an earlier
        run's, with ``manifest.json`` (names, sizes, SHA-256) as the completion marker."""
        staging = Path(staging)
        files = _scene_files(staging)
        manifest = _manifest(files)
        if not self.remote:
            (staging / MANIFEST).write_text(manifest)
            final = self._dir / name
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                old = self._dir / f".{_flat(name)}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(staging, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staging, final)
            return
        from boto3.s3.transfer import TransferConfig

        s3, bucket = self._client, self._bucket
        scene_prefix = self._key(name) + "/"
        transfer = TransferConfig(max_concurrency=4)
        try:
            # Unpublish first: from here until the new manifest is put, readers see no scene.
            s3.delete_object(Bucket=bucket, Key=scene_prefix + MANIFEST)
            for name, path in files.items():
                s3.upload_file(
                    str(path),
                    bucket,
                    scene_prefix + name,
                    Config=transfer,
                    ExtraArgs={"ContentType": _content_type(name)},
                )
            stale = [
                obj["Key"]
                for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=scene_prefix)
                for obj in page.get("Contents", [])
                if obj["Key"][len(scene_prefix) :] not in files and obj["Key"] != scene_prefix + MANIFEST
            ]
            for i in range(0, len(stale), 1000):
                s3.delete_objects(
                    Bucket=bucket, Delete={"Objects": [{"Key": k} for k in stale[i : i + 1000]], "Quiet": True}
                )
            s3.put_object(
                Bucket=bucket, Key=scene_prefix + MANIFEST, Body=manifest.encode(), ContentType="application/json"
            )
        except boto_errors() as exc:
            raise OutputError(self.uri(name), f"publishing failed: {error_reason(exc)}") from None
        shutil.rmtree(staging, ignore_errors=True)

    def remove_leftovers(self) -> list[str]:
        """Delete staging folders a killed run left beside the outputs (call holding the run lock,
        so no other run is writing them), but those holding tile checkpoints, which the scene's
        next run resumes; returns their names. Published scenes are not touched."""
        if self.remote or not self._dir.is_dir():
            return []
        gone = [
            p.name
            for p in self._dir.iterdir()
            if p.is_dir()
            and p.name.startswith(".")
            and p.name.endswith((".partial", ".old"))
            and not (p / STAMP_FILE).is_file()
        ]
        for name in gone:
            shutil.rmtree(self._dir / name, ignore_errors=True)
        return gone

    def discard(self, staging: Path) -> None:
        """Drop a failed scene's staging folder; an earlier published ``<stem>/`` stays as it was."""
        staging = Path(staging)
        if not self.remote and staging.resolve().parent == self._dir.resolve() and not staging.name.startswith("."):
            raise ValueError(f"{staging}: not a staging folder, refusing to delete a published scene")
        shutil.rmtree(staging, ignore_errors=True)

    # -- small files
    def read_text(self, relpath: str) -> str | None:
        """The text of ``relpath`` (e.g. ``scene/summary.json``), None when it is not there. On S3 a
        file inside a scene counts only when that scene's manifest exists (a half-published scene is
        not there); on disk a scene folder appears only by an atomic rename."""
        relpath = relpath.strip("/")
        if not self.remote:
            try:
                return (self._dir / relpath).read_text()
            except (FileNotFoundError, NotADirectoryError):
                return None
            except OSError as exc:
                raise OutputError(self.uri(relpath), f"cannot read ({exc.strerror or exc})") from None
        folder, sep, leaf = relpath.rpartition("/")
        try:
            if sep and leaf != MANIFEST:
                try:
                    self._client.head_object(Bucket=self._bucket, Key=self._key(f"{folder}/{MANIFEST}"))
                except boto_errors() as exc:
                    if is_missing(exc):
                        return None
                    raise
            body = self._client.get_object(Bucket=self._bucket, Key=self._key(relpath))["Body"]
            return body.read().decode()
        except boto_errors() as exc:
            if is_missing(exc):
                return None
            raise OutputError(self.uri(relpath), f"cannot read: {error_reason(exc)}") from None

    def write_text(self, relpath: str, text: str) -> None:
        """Write a run-level file such as ``summary.csv`` whole (readers never see half of it)."""
        relpath = relpath.strip("/")
        if self.remote:
            try:
                self._client.put_object(
                    Bucket=self._bucket, Key=self._key(relpath), Body=text.encode(), ContentType=_content_type(relpath)
                )
            except boto_errors() as exc:
                raise OutputError(self.uri(relpath), f"cannot write: {error_reason(exc)}") from None
            return
        path = self._dir / relpath
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, path)
        except OSError as exc:
            raise OutputError(self.uri(relpath), f"cannot write ({exc.strerror or exc})") from None


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON under a temporary name, then rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
