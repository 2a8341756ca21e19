"""Inputs from a STAC API search (``geoseg run --stac-api URL --collections C ...``, or a config's
``stac_api:`` section): the API's ``/search`` is asked once, before any work, for the Items of the
collections, in a bbox and a datetime range, with a query or a CQL2-JSON filter, at most
``max_items`` of them (pystac-client pages through the answer).

Each Item found is one input named by its URL on the API (its ``self`` link) and processed like a
STAC Item file (``geoseg.raster.stac_input``): its output folder is its id, its output Item links to
that URL (``derived_from``), and a nightly rerun skips it while its ``updated`` time and its assets
are unchanged. An API that cannot be reached, or answers an error, stops the run before any work
with one line naming the URL and the HTTP status or the connection error (``SourceError``).
"""

from __future__ import annotations

import json
import logging
import re
from http import HTTPStatus
from typing import Any

import pystac

from geoseg.core.config import StacApiConfig
from geoseg.core.errors import ConfigError, SourceError
from geoseg.raster.stac_input import remember_items

log = logging.getLogger("geoseg")
TIMEOUT_S = (10.0, 120.0)  # connect, read: an API that hangs fails the night instead of holding it
PAGE_SIZE = 100  # Items per page asked of the API (pystac-client follows the `next` links)


def search_inputs(api: StacApiConfig) -> list[str]:
    """Search the API; the URLs of the Items found, which the run then takes as inputs."""
    found = search_items(api)
    remember_items(found)
    if found:
        log.info("%s: %d Item(s) in %s", api.url, len(found), ", ".join(api.collections))
    else:
        log.warning("STAC API %s: no Item of %s matches the search", api.url, ", ".join(api.collections))
    return [url for url, _item in found]


def search_items(api: StacApiConfig) -> list[tuple[str, pystac.Item]]:
    """Every Item the search finds, with its URL. ``SourceError`` naming the API when it cannot be
    reached or answers an error; ``ConfigError`` when pystac-client refuses a parameter."""
    from pystac_client import Client
    from pystac_client.stac_api_io import StacApiIO
    from urllib3.util.retry import Retry

    # A gateway that says "try again" (502, 503, 504) is asked again up to three times (0, 1 and 2 s
    # later); any other error stops the search at once.
    retry = Retry(
        total=3, backoff_factor=0.5, status_forcelist=(502, 503, 504), allowed_methods=None, raise_on_status=False
    )
    # urllib3 logs each retry as a warning: the run's one line about the API is enough (-vv shows them).
    urllib3_log = logging.getLogger("urllib3")
    level = urllib3_log.level
    if not log.isEnabledFor(logging.DEBUG):
        urllib3_log.setLevel(logging.ERROR)
    try:
        client = Client.open(api.url, stac_io=StacApiIO(timeout=TIMEOUT_S, max_retries=retry))
        try:
            search = client.search(
                collections=api.collections,
                bbox=api.bbox,
                datetime=api.datetime,
                query=api.query,
                filter=api.filter,
                filter_lang="cql2-json" if api.filter is not None else None,
                max_items=api.max_items,
                limit=min(PAGE_SIZE, api.max_items or PAGE_SIZE),
            )
        except Exception as exc:  # noqa: BLE001 (pystac-client checks the parameters before asking, raising Exception)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ConfigError("stac_api", "", f"bad search: {first}") from None
        items = list(search.items())
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 (requests, pystac-client and pystac raise many kinds)
        raise SourceError(f"STAC API {api.url}", _problem(exc)) from None
    finally:
        urllib3_log.setLevel(level)
    found: dict[str, pystac.Item] = {}
    for item in items:
        found.setdefault(item_url(api.url, item), item)
    return list(found.items())


def item_url(api_url: str, item: pystac.Item) -> str:
    """An Item's URL on the API: its ``self`` link, else the API's standard Item path."""
    href = item.get_self_href()
    if href and href.startswith(("http://", "https://")):
        return href
    return f"{api_url.rstrip('/')}/collections/{item.collection_id}/items/{item.id}"


def _problem(exc: Exception) -> str:
    """One line: the HTTP status (and the API's own words for it), or why no answer came."""
    text = str(exc)
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
        detail = _detail(text)
        return f"HTTP {status} {phrase}".rstrip() + (f" ({detail})" if detail and detail != phrase else "")
    errno = re.search(r"\[Errno -?\d+\] ([^'\"()\]\\]+)", text)
    if errno:
        return f"cannot connect: {errno.group(0).strip()}"
    if "timed out" in text.lower():
        return f"no answer within {TIMEOUT_S[1]:.0f} s (read timed out)"
    line = text.strip().splitlines()[0][:200] if text.strip() else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _detail(body: str) -> str:
    """What an error answer says, when it says it in a short line (JSON ``description``/``detail``)."""
    try:
        data: Any = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        for key in ("description", "detail", "message"):
            if isinstance(data.get(key), str):
                return " ".join(data[key].split())[:200]
        return ""
    line = " ".join(body.split())
    return line[:200] if line and "<" not in line else ""  # an HTML error page says nothing useful here
