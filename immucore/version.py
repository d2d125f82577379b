"""immucore's version, read from one place: the package metadata (``version`` in
pyproject.toml, installed with the package). The node reports it (``HEALTH``, ``SERVER_INFO``,
its banner) and every command prints it (``--version``)."""
from __future__ import annotations

import os
import re
from importlib import metadata

DISTRIBUTION = "immucore"
UNKNOWN = "unknown"


def _read() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pass
    # not installed (a checkout on PYTHONPATH): the pyproject.toml beside the package
    pyproject = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "pyproject.toml")
    try:
        with open(pyproject, encoding="utf-8") as f:
            found = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.MULTILINE)
    except OSError:
        found = None
    return found.group(1) if found else UNKNOWN


VERSION = _read()
