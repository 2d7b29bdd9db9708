"""Every exception dctstream raises on purpose.

A ``DctStreamError`` is a problem with the user's input or environment: the
command line prints its message as one line and exits non-zero.  Any other
exception is a bug and keeps its traceback.
"""


class DctStreamError(Exception):
    """Base class: the message is one line, ``<where>: <what>, expected <x>, got <y>``."""

    exit_code = 1


class ConfigError(DctStreamError):
    """A configuration file or ``--set`` override is invalid."""

    exit_code = 2


class InputError(DctStreamError):
    """A scan, dark or angles file is missing or has the wrong shape or type."""


class AnotherScanError(InputError):
    """The scan is not the one whose unfinished run is in the output folder (its file was written anew)."""


class OutputError(DctStreamError):
    """The output folder cannot be written."""


class OptionalDependencyError(DctStreamError, ImportError):
    """A feature needs a package that is not installed (pandas for tables, matplotlib for plots)."""


class ResourceError(DctStreamError):
    """The run cannot fit in the memory (or other resource) this process may use."""
