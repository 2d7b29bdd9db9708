"""The configurations installed with dctstream: ``default`` and the examples, by name.

``dctstream run`` without a config file uses ``default``; a config argument
that is not a file but names one of these (``sim512`` or ``sim512.yml``) uses
the packaged one.  ``dctstream config list|show NAME`` prints them.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEFAULT = "default"


def names() -> list[str]:
    """The packaged configurations, without their ``.yml``."""
    return sorted(p.name[:-4] for p in resources.files(__name__).iterdir() if p.name.endswith(".yml"))


def config_file(name: str | None) -> str | Path:
    """The file a config argument names: a file, else the packaged config of that name; the packaged
    default when None.  A name that is neither is returned as is (reading it says it is missing)."""
    if name is None:
        return packaged_path(DEFAULT)
    if not Path(name).exists():
        return packaged_path(name) or name
    return name


def packaged_path(name: str) -> Path | None:
    """The file of the packaged configuration ``name`` (with or without ``.yml``), or None."""
    stem = name[:-4] if name.endswith(".yml") else name
    if stem not in names():
        return None
    # a plain folder in every installation dctstream supports (no zipped packages): a real path
    return Path(str(resources.files(__name__) / f"{stem}.yml"))
