"""User-facing errors.

Every error a user can cause is raised as a :class:`FusarbatchError` whose message is one line that names
the input and the fix. The CLI prints it without a traceback and exits with :attr:`exit_code`.

Exit codes (README): 0 all done, 1 some scenes failed or a runtime error, 2 usage error (bad input),
75 locked.
"""

from __future__ import annotations


class FusarbatchError(Exception):
    """Base class: a one-line, user-facing error. ``exit_code`` is what the CLI exits with."""

    exit_code: int = 1


class UsageError(FusarbatchError):
    """Bad input from the user (arguments, AOI file, config): exit code 2."""

    exit_code = 2


class AOIError(UsageError):
    """The AOI file is missing, malformed, empty or overlaps nothing."""


class CatalogError(FusarbatchError):
    """A catalog cannot be resolved, opened or searched (unknown name, unreachable URL, bad file)."""

    exit_code = 2


class SceneError(FusarbatchError):
    """One scene cannot be processed (missing or unreadable asset, corrupt raster).

    Raised per scene: the pipeline records the scene as failed with this message and goes on.
    """


class ModelError(FusarbatchError):
    """A model, adapter or TLM directory is missing, incomplete or does not match (exit code 2)."""

    exit_code = 2
