"""S3 and GDAL paths: which locations are S3 objects, their ``/vsis3/`` names for GDAL, the storage
variables each Ray worker is handed (``storage_env`` / ``apply_storage_env``), what identifies a
file's bytes (a local file's size and mtime, an S3 object's or an HTTP(S) file's size and ETag or
Last-Modified), and the rasters under a prefix. Both GDAL and boto3 take endpoint and credentials from the
environment, so the driver passes the variables on rather than every worker depending on how its
node was set up."""

from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from geoseg.core.errors import InputError

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


def split_uri(uri: str) -> tuple[str, str]:
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


def s3_client() -> Any:
    """A fresh S3 client; a new session each time because boto3's default session is not
    thread-safe (scenes are published from a thread). Endpoint and credentials come from the
    environment: botocore >= 1.31 reads AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 itself."""
    import boto3

    return boto3.session.Session().client("s3")


def error_reason(exc: BaseException) -> str:
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


def is_missing(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and str(exc.response.get("Error", {}).get("Code")) in (
        "NoSuchKey",
        "404",
        "NotFound",
    )


def boto_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (ClientError, BotoCoreError)


def object_info(uri: str) -> dict[str, Any] | None:
    """Size and ETag of object ``s3://bucket/key`` (or ``/vsis3/bucket/key``); None when it cannot
    be reached (reading it will say why)."""
    bucket, key = split_uri("s3://" + uri[len("/vsis3/") :] if uri.startswith("/vsis3/") else uri)
    try:
        head = s3_client().head_object(Bucket=bucket, Key=key)
    except boto_errors():
        return None
    return {"bytes": int(head["ContentLength"]), "etag": str(head.get("ETag", "")).strip('"')}


HTTP_HEAD_TIMEOUT_S = 20


def url_info(url: str) -> dict[str, Any] | None:
    """Size and ETag (or Last-Modified, where the server sends no ETag) of the file at an ``http(s)://``
    URL, from one HEAD request; None when it cannot be reached or says neither (reading it will say
    why). A signed URL's query (Planetary Computer's tokens) changes from search to search; these
    headers describe the bytes and do not."""
    try:
        request = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(request, timeout=HTTP_HEAD_TIMEOUT_S) as answer:
            headers = answer.headers
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError):
        return None
    tag = {"etag": headers["ETag"].strip('"')} if headers.get("ETag") else {}
    if not tag and headers.get("Last-Modified"):
        tag = {"last_modified": headers["Last-Modified"]}
    if not tag:
        return None
    length = headers.get("Content-Length")
    return {"bytes": int(length) if length and length.isdigit() else None, **tag}


def is_http(path: str) -> bool:
    """``http(s)://`` URLs, and GDAL's ``/vsicurl/`` form of them."""
    lowered = str(path).lower()
    return lowered.startswith(("http://", "https://", "/vsicurl/http://", "/vsicurl/https://"))


def file_fingerprint(path: str) -> dict[str, Any] | None:
    """What identifies a file's bytes without reading them: size and mtime of a local file, size and
    ETag of an S3 object, size and ETag or Last-Modified of an HTTP(S) file; None where none is known
    (the input is then always processed)."""
    if is_s3(path) or path.startswith("/vsis3/"):
        return object_info(path)
    if is_http(path):
        return url_info(path.removeprefix("/vsicurl/"))
    if "://" in path:  # another scheme (gs://, az://): nothing known without its SDK
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def list_rasters(prefix: str, recursive: bool = False) -> list[str]:
    """The GeoTIFFs under ``s3://bucket/prefix/`` (``.tif``/``.tiff``, any case), as sorted ``s3://``
    URIs: those directly under it, like a local folder, or with ``recursive`` every "folder" below."""
    bucket, key = split_uri(prefix)
    if not bucket:
        raise InputError(prefix, "no bucket in the S3 location")
    key_prefix = f"{key}/" if key else ""
    found: list[str] = []
    try:
        paginate = {"Bucket": bucket, "Prefix": key_prefix, **({} if recursive else {"Delimiter": "/"})}
        for page in s3_client().get_paginator("list_objects_v2").paginate(**paginate):
            for obj in page.get("Contents", []):
                name = obj["Key"][len(key_prefix) :]
                if name and (recursive or "/" not in name) and name.lower().endswith(RASTER_SUFFIXES):
                    found.append(f"s3://{bucket}/{obj['Key']}")
    except boto_errors() as exc:
        raise InputError(prefix, error_reason(exc)) from None
    return sorted(found)
