"""``--version`` (every command) and ``version`` (immuadmin, immuclient): the one version of
the package metadata (immucore/version.py), printed as ``<prog> <version>``."""
from __future__ import annotations

import argparse

from ..version import VERSION


def version_text(prog: str) -> str:
    return f"{prog} {VERSION}"


def add_version_flag(parser: argparse.ArgumentParser, prog: str):
    parser.add_argument("--version", action="version", version=version_text(prog),
                        help="print the version and exit")


def add_version_command(commands, prog: str):
    """A ``version`` subcommand, as immudb's tools have; it needs no node (so no flags)."""
    sub = commands.add_parser("version", help="print the version",
                              description="print the version")
    sub.set_defaults(run=lambda args: print(version_text(prog)))
