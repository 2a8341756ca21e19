"""Ray's errors as one plain line that names the real cause: no traceback, no terminal codes, no
``ray::f()`` framing. Used by the driver (actors, scheduler); the workers never see Ray errors."""

from __future__ import annotations

import re
from typing import Any

import ray


def actor_hex(actor: Any) -> str:
    return actor._actor_id.hex()


def ray_cause(exc: BaseException) -> BaseException:
    """The error under Ray's wrapping: a task whose argument could not be computed raises
    ``RayTaskError`` with the argument's error as its cause, and so on down the chain."""
    for _ in range(32):
        cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else None
        if cause is None or cause is exc:
            break
        exc = cause
    return exc


_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")  # terminal escapes: colours, cursor moves


def plain_line(text: str) -> str:
    """One plain line: no terminal codes, whitespace (newlines too) collapsed."""
    return " ".join(_ANSI.sub("", text).split())


def death_detail(exc: BaseException) -> str:
    """Why a Ray actor died and which process it was, in a few words (from Ray's message)."""
    text = _ANSI.sub("", str(exc))
    pid = re.search(r"\bpid[:=] ?(\d+)", text)
    ip = re.search(r"\bip[:=] ?([0-9A-Fa-f.:]+[0-9A-Fa-f])", text)
    proc = f"pid {pid.group(1)}{f' on {ip.group(1)}' if ip else ''}" if pid else ""
    if "node has died" in text or "node was terminated" in text:
        why = "its node died"
    elif "unavailable" in text:
        why = "it stopped answering (its node may have died)"
    elif "not schedulable" in text:
        why = "it could not be placed (its node is gone)"
    elif "ray.kill" in text:
        why = "it was killed with ray.kill"
    elif "creation task" in text:
        why = f"it failed while starting: {error_line(text)}"
    elif "low on memory" in text:
        why = "its node ran low on memory"
    elif "worker process has died" in text or "unexpectedly" in text:
        why = "its process was killed or crashed, e.g. out of memory, by a signal or in native code"
    else:
        why = error_line(text)
    return f"{why}; {proc}" if proc else why


def why_died(exc: BaseException) -> str:
    """Why an actor call failed: the death in a few words, else the error in one line."""
    cause = ray_cause(exc)
    return death_detail(cause) if isinstance(cause, ray.exceptions.ActorDiedError) else one_line_error(exc)


def error_line(text: str) -> str:
    """The line that says what went wrong: the last ``SomeError: message`` line, else the first
    line that is not Ray's framing (``ray::f() (pid=...)``, tracebacks)."""
    lines = [ln.strip() for ln in _ANSI.sub("", text).splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*:", ln)]
    if errors:
        return errors[-1][:300]
    framing = ("ray::", "At least one of the input arguments", "Traceback", "File ", "^")
    rest = [ln for ln in lines if not ln.startswith(framing)]
    return (rest or lines or [""])[0][:300]


def one_line_error(exc: BaseException) -> str:
    """The real cause of a Ray error, in one plain line (no traceback, no terminal colours)."""
    exc = ray_cause(exc)
    if isinstance(exc, ray.exceptions.ActorDiedError):
        return f"a Ray actor died ({death_detail(exc)})"
    if isinstance(exc, ray.exceptions.WorkerCrashedError):
        return (
            "its worker process died each time Ray ran this task (killed or crashed: out of memory, a signal, "
            "a crash in native code)"
        )
    if isinstance(exc, ray.exceptions.OutOfMemoryError):
        return "Ray stopped this task each time it ran: its node was low on memory"
    if isinstance(exc, ray.exceptions.ObjectLostError):
        return "its data was lost with a node that went away"
    if isinstance(exc, ray.exceptions.RayError):  # Ray's framing around the message
        return plain_line(error_line(str(exc))) or type(exc).__name__
    lines = [ln for ln in _ANSI.sub("", str(exc)).splitlines() if ln.strip()]
    return plain_line(lines[0])[:300] if lines else type(exc).__name__
