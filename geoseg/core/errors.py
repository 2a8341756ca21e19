"""Exceptions raised by geoseg; each message names the file (or key) and what is wrong."""

from __future__ import annotations


class GeosegError(Exception):
    """Root of every error geoseg raises on purpose."""

    _fields: tuple[str, ...] = ()

    def __reduce__(self) -> tuple[type[GeosegError], tuple[object, ...]]:
        # Rebuild from the fields, not the message, so errors survive Ray's pickling.
        return (type(self), tuple(getattr(self, f) for f in self._fields))


class ConfigError(GeosegError, ValueError):
    """A configuration file or flag is invalid."""

    _fields = ("source", "key", "problem")

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source, self.key, self.problem = source, key, problem
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}")


class InputError(GeosegError, ValueError):
    """An input raster cannot be processed (unreadable, no CRS, too few bands, ...)."""

    _fields = ("path", "problem")

    def __init__(self, path: str, problem: str) -> None:
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


class ModelError(GeosegError, ValueError):
    """A model cannot be built or loaded, or does not match its configuration."""

    _fields = ("model", "problem")

    def __init__(self, model: str, problem: str) -> None:
        self.model, self.problem = model, problem
        super().__init__(f"model '{model}': {problem}")


class OutputError(GeosegError, OSError):
    """The output location cannot be written."""

    _fields = ("path", "problem")

    def __init__(self, path: str, problem: str) -> None:
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


class SourceError(GeosegError, OSError):
    """A source of inputs (a STAC API) cannot be searched: the run stops before any work."""

    _fields = ("source", "problem")

    def __init__(self, source: str, problem: str) -> None:
        self.source, self.problem = source, problem
        super().__init__(f"{source}: {problem}")
