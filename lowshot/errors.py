"""The exceptions lowshot raises. The CLI turns each into one line on stderr and a non-zero exit."""

from __future__ import annotations


class LowshotError(Exception):
    """Base class: a problem the user can fix, described in one line."""

    exit_code = 1


class BadInputError(LowshotError):
    """An option or argument has a value that cannot work (names the value)."""

    exit_code = 2


class DataError(LowshotError):
    """The data folder, dataset or split is missing, empty or inconsistent."""


class ModelLoadError(LowshotError):
    """The backbone cannot be loaded (offline and not cached, not a vision model, bad folder)."""


class CacheError(LowshotError):
    """The feature cache cannot be read or written, or holds no matching entry."""


class SplitError(LowshotError):
    """A labelled subset cannot be drawn (too few images in a class, a split file that matches nothing)."""


class MissingDependencyError(LowshotError):
    """An optional extra is needed for this feature and is not installed (names the pip command)."""


class ProtocolMismatchError(LowshotError):
    """Results measured under different protocol settings were asked to be compared (refused unless forced)."""

    exit_code = 2


class OutputError(LowshotError):
    """A file could not be written at the end of the work; the message says where its content was kept instead."""


class RegressionError(LowshotError):
    """The regression gate failed: a split's mean top-1 dropped by more than the allowed points."""


class SettingError(BadInputError):
    """One setting of :class:`~lowshot.config.ExtractSettings` or :class:`~lowshot.config.ProbeSettings` has a bad
    value. The core names the parameter (``shots``); each front end maps it to its own spelling (``--shots``)."""

    def __init__(self, param: str, value: object, reason: str):
        self.param, self.value, self.reason = param, value, reason
        super().__init__(self.spelled(param))

    def spelled(self, name: str) -> str:
        """The message with the parameter spelled as ``name`` (a CLI flag, a TOML key)."""
        value = self.value
        shown = f"{value:g}" if isinstance(value, float) else repr(value) if isinstance(value, str) else value
        return f"{name} {shown}: {self.reason}"


class MissingFeaturesError(CacheError):
    """The probe needs images whose features are not in the cache, and was not told where to encode them from."""

    def __init__(self, message: str, *, model: str | None, data: str | None, missing: int):
        self.model, self.data, self.missing = model, data, missing
        super().__init__(message)
