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


class RegressionError(LowshotError):
    """The regression gate failed: a split's mean top-1 dropped by more than the allowed points."""
