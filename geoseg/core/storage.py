"""Object storage in and out: inputs and outputs may live in S3 (or any S3 API) as well as on disk.

GDAL reads ``/vsis3/`` paths and boto3 writes; both take their endpoint and credentials from the
environment, so the driver hands the storage variables to each Ray worker (``storage_env`` /
``apply_storage_env``) rather than every worker depending on how its node was set up.

Outputs go through ``OutputStore``: a scene's files are written into a local staging folder and
published as a whole. A scene counts as published only once its ``manifest.json`` exists: on disk
the folder is renamed into place; on S3 the old manifest is deleted first and the new one put last,
so a reader never takes a half-replaced scene for a complete one.
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
from urllib.parse import urlsplit

from geoseg.core.checkpoint import STAMP_FILE, TILES_DIR, stamp_matches, write_stamp
from geoseg.core.errors import InputError, OutputError

MANIFEST = "manifest.json"
RASTER_SUFFIXES = (".tif", ".tiff")

# Variables a worker needs to reach object storage, read by boto3 and/or GDAL (GDAL reads any
# configuration option from the environment when it is not set otherwise).
_STORAGE_VARS = (
    # boto3 / AWS SDKs (AWS_ENDPOINT_URL[_S3]: botocore >= 1.31 honours them on its own)
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CA_BUNDLE",
    "AWS_REQUEST_PAYER",
    # GDAL /vsis3/ (it has no AWS_ENDPOINT_URL: host in AWS_S3_ENDPOINT, scheme in AWS_HTTPS)
    "AWS_S3_ENDPOINT",
    "AWS_HTTPS",
    "AWS_VIRTUAL_HOSTING",
    "AWS_NO_SIGN_REQUEST",
    "AWS_DEFAULT_PROFILE",
    "CPL_AWS_CREDENTIALS_FILE",
    "CPL_AWS_AUTODETECT_EC2",
    "GDAL_DISABLE_READDIR_ON_OPEN",
    "VSI_CACHE",
    "VSI_CACHE_SIZE",
    "CURL_CA_BUNDLE",
)
# GDAL's network options: HTTP retries/timeouts/proxy, /vsicurl/ cache and ranges, /vsis3/ tuning.
_STORAGE_PREFIXES = ("GDAL_HTTP_", "CPL_VSIL_CURL_", "CPL_VSIS3_", "CPL_CURL_", "VSIS3_")
_TRUE = {"1", "yes", "true", "on"}


# --------------------------------------------------------------------------- paths and environment


def is_s3(location: str | os.PathLike[str]) -> bool:
    """True for ``s3://bucket/key`` locations (GDAL's ``/vsis3/`` form is a path, not a URI)."""
    return str(location)[:5].lower() == "s3://"


def _split(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")`` (key without leading or trailing slash)."""
    bucket, _, key = str(uri)[5:].partition("/")
    return bucket, key.strip("/")


def gdal_path(path: str) -> str:
    """The path GDAL (rasterio) opens: ``s3://b/k.tif`` -> ``/vsis3/b/k.tif``.

    Handing GDAL the ``/vsis3/`` form keeps rasterio from wrapping ``s3://`` paths in its own boto3
    session; GDAL then takes endpoint and credentials from the environment (``storage_env``).
    Local paths and other ``/vsi...`` paths are returned unchanged.
    """
    path = str(path)
    if is_s3(path):
        return "/vsis3/" + path[5:]
    return path


def storage_env() -> dict[str, str]:
    """The storage variables set in this process, for workers that need the same access.

    When ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``, which boto3 prefers) is set and GDAL's
    ``AWS_S3_ENDPOINT`` is not, the GDAL variables are derived from it so ``/vsis3/`` reaches the
    same server as boto3: ``AWS_S3_ENDPOINT`` = host[:port][/path], ``AWS_HTTPS`` = YES/NO from the
    scheme, and ``AWS_VIRTUAL_HOSTING=FALSE`` (path-style requests, what S3-compatible servers
    such as MinIO or moto expect) unless it is already set.
    """
    env = {k: v for k, v in os.environ.items() if k in _STORAGE_VARS or k.startswith(_STORAGE_PREFIXES)}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    ignored = env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() in _TRUE
    if endpoint and not ignored and "AWS_S3_ENDPOINT" not in env:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        if parts.netloc:
            env["AWS_S3_ENDPOINT"] = parts.netloc + parts.path.rstrip("/")
            env["AWS_HTTPS"] = "NO" if parts.scheme.lower() == "http" else "YES"
            env.setdefault("AWS_VIRTUAL_HOSTING", "FALSE")
    return env


def apply_storage_env(env: dict[str, str]) -> None:
    """Set the driver's storage variables in this worker's environment (call at the start of a Ray
    task or actor), so GDAL and boto3 in this process reach the same storage as the driver."""
    os.environ.update(env)


def _client() -> Any:
    """A fresh S3 client; a new session each time because boto3's default session is not
    thread-safe (scenes are published from a thread). Endpoint and credentials come from the
    environment: botocore >= 1.31 reads AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 itself."""
    import boto3

    return boto3.session.Session().client("s3")


def _reason(exc: BaseException) -> str:
    """One line for a boto3/botocore error: never the XML body or a traceback."""
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "")) or "error"
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket" or (code in ("404", "NotFound") and exc.operation_name == "HeadBucket"):
            return "bucket does not exist (NoSuchBucket)"
        if code in ("AccessDenied", "403") or status == 403:
            return f"access denied ({'AccessDenied' if code == '403' else code})"
        message = str(error.get("Message") or "").strip().splitlines()
        return f"{message[0]} ({code})" if message else f"{exc.operation_name} failed ({code})"
    return " ".join(str(exc).split()) or type(exc).__name__


def _is_missing(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and str(exc.response.get("Error", {}).get("Code")) in (
        "NoSuchKey",
        "404",
        "NotFound",
    )


def _boto_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (ClientError, BotoCoreError)


def object_info(uri: str) -> dict[str, Any] | None:
    """Size and ETag of object ``s3://bucket/key`` (or ``/vsis3/bucket/key``); None when it cannot
    be reached (reading it will say why)."""
    bucket, key = _split("s3://" + uri[len("/vsis3/") :] if uri.startswith("/vsis3/") else uri)
    try:
        head = _client().head_object(Bucket=bucket, Key=key)
    except _boto_errors():
        return None
    return {"bytes": int(head["ContentLength"]), "etag": str(head.get("ETag", "")).strip('"')}


def file_fingerprint(path: str) -> dict[str, Any] | None:
    """What identifies a file's bytes without reading them: size and mtime of a local file, size and
    ETag of an S3 object; None where neither is known."""
    if is_s3(path) or path.startswith("/vsis3/"):
        return object_info(path)
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def list_rasters(prefix: str, recursive: bool = False) -> list[str]:
    """The GeoTIFFs under ``s3://bucket/prefix/`` (``.tif``/``.tiff``, any case), as sorted ``s3://``
    URIs: those directly under it, like a local folder, or with ``recursive`` every "folder" below."""
    bucket, key = _split(prefix)
    if not bucket:
        raise InputError(prefix, "no bucket in the S3 location")
    key_prefix = f"{key}/" if key else ""
    found: list[str] = []
    try:
        paginate = {"Bucket": bucket, "Prefix": key_prefix, **({} if recursive else {"Delimiter": "/"})}
        for page in _client().get_paginator("list_objects_v2").paginate(**paginate):
            for obj in page.get("Contents", []):
                name = obj["Key"][len(key_prefix) :]
                if name and (recursive or "/" not in name) and name.lower().endswith(RASTER_SUFFIXES):
                    found.append(f"s3://{bucket}/{obj['Key']}")
    except _boto_errors() as exc:
        raise InputError(prefix, _reason(exc)) from None
    return sorted(found)


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
            self._bucket, self._prefix = _split(self.location)
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
            self._s3 = _client()
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
        probe = self._key(f".geoseg-write-test-{os.getpid()}")
        try:
            self._client.put_object(Bucket=self._bucket, Key=probe, Body=b"")
            self._client.delete_object(Bucket=self._bucket, Key=probe)
        except _boto_errors() as exc:
            raise OutputError(self.location, _reason(exc)) from None

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
        except _boto_errors() as exc:
            raise OutputError(self.uri(name), f"publishing failed: {_reason(exc)}") from None
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
                except _boto_errors() as exc:
                    if _is_missing(exc):
                        return None
                    raise
            body = self._client.get_object(Bucket=self._bucket, Key=self._key(relpath))["Body"]
            return body.read().decode()
        except _boto_errors() as exc:
            if _is_missing(exc):
                return None
            raise OutputError(self.uri(relpath), f"cannot read: {_reason(exc)}") from None

    def write_text(self, relpath: str, text: str) -> None:
        """Write a run-level file such as ``summary.csv`` whole (readers never see half of it)."""
        relpath = relpath.strip("/")
        if self.remote:
            try:
                self._client.put_object(
                    Bucket=self._bucket, Key=self._key(relpath), Body=text.encode(), ContentType=_content_type(relpath)
                )
            except _boto_errors() as exc:
                raise OutputError(self.uri(relpath), f"cannot write: {_reason(exc)}") from None
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
