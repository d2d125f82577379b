"""``immucore``: run a node (flags follow immudb's server flags).

Each flag can also be set by an environment variable ``IMMUCORE_<FLAG>`` (upper case, dashes
as underscores: ``IMMUCORE_MAX_SESSIONS``, ``IMMUCORE_SIGNINGKEY``), or by immudb's own
``IMMUDB_<FLAG>`` (``IMMUDB_REPLICATION_IS_REPLICA``: Compose and Helm files written for immudb
work as they are; where both are set the ``IMMUCORE_`` one wins and the node logs the other as
ignored; an empty variable counts as unset, as in immudb), or a key of a TOML file
(``--config``; the flag's name: ``max-sessions``, ``signingKey``). Precedence: command line,
then environment, then the file, then defaults."""
from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import sys

from ..constants import (CONNECTIONS_MAX_DEFAULT, DATABASES_ACTIVE_MAX_DEFAULT,
                         REPLICATION_SYNC_TIMEOUT_SECONDS, SESSIONS_MAX_DEFAULT)
from .flags import (REPLICATION_FLAGS, add_bool, add_replication_flags, normalize_bool_flags,
                    parse_bool)
from .version import add_version_flag

log = logging.getLogger("immucore")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="immucore", description=__doc__.replace("``", "'"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="data folder (default ./data)")
    parser.add_argument("-a", "--address", default=None, help="bind address (default 0.0.0.0)")
    parser.add_argument("-p", "--port", type=int, default=None, help="port (default 3322)")
    parser.add_argument("--grpc-port", type=int, default=None,
                        help="where immudb's gRPC API (immudb's SDKs and tools) is served: 0 "
                             "(default): on --port, beside the native protocol; another port: "
                             "there instead; -1: not served (docs/grpc.md)")
    parser.add_argument("--admin-password", default=None,
                        help="password of the immudb sysadmin user on first start "
                             "(default immudb)")
    add_bool(parser, "--synced", dest="synced", default=None,
             help="fsync every commit before acknowledging it (default true)")
    parser.add_argument("--max-sessions", type=int, default=None,
                        help=f"maximum open sessions (default {SESSIONS_MAX_DEFAULT})")
    parser.add_argument("--max-connections", type=int, default=None,
                        help="maximum open client connections; more are refused with "
                             f"too_many_connections (default {CONNECTIONS_MAX_DEFAULT})")
    parser.add_argument("--max-active-databases", type=int, default=None,
                        help="maximum databases loaded at once, systemdb aside (each runs an "
                             "index worker process); a create or load past it is refused "
                             f"(default {DATABASES_ACTIVE_MAX_DEFAULT})")
    add_bool(parser, "--metrics-server", dest="metrics_server", default=None,
             help="serve Prometheus metrics (default true)")
    parser.add_argument("--metrics-server-port", type=int, default=None,
                        help="metrics port (default 9497)")
    parser.add_argument("--pidfile", default=None, help="write the process id to this file")
    parser.add_argument("--logfile", default=None, help="log to this file (default stderr)")
    parser.add_argument("--config", default=None, help="TOML file with any of these flags")
    parser.add_argument("--certificate", default=None,
                        help="TLS: the node's certificate (PEM); with --pkey, clients must use TLS")
    parser.add_argument("--pkey", default=None, help="TLS: the certificate's private key (PEM)")
    parser.add_argument("--replication-tls-ca", dest="replication_tls_ca", default=None,
                        help="replicators connect to primaries with TLS, verifying their "
                             "certificate against this CA file (PEM)")
    parser.add_argument("--replication-sync-timeout", dest="replication_sync_timeout",
                        type=float, default=None,
                        help="seconds a sync commit waits for its replica acknowledgements "
                             "before the write fails (it stays durable on the primary; default "
                             f"{REPLICATION_SYNC_TIMEOUT_SECONDS:g})")
    parser.add_argument("--signingKey", dest="signing_key", default=None,
                        help="ECDSA P-256 private key (PEM) used to sign states")
    add_replication_flags(parser)
    add_version_flag(parser, "immucore")
    return parser


_DEFAULTS = {"dir": "./data", "address": "0.0.0.0", "port": 3322, "grpc_port": 0,
             "admin_password": "immudb",
             "synced": True, "max_sessions": SESSIONS_MAX_DEFAULT,
             "max_connections": CONNECTIONS_MAX_DEFAULT,
             "max_active_databases": DATABASES_ACTIVE_MAX_DEFAULT, "metrics_server": True,
             "metrics_server_port": 9497, "pidfile": "", "logfile": "", "signing_key": "",
             "certificate": "", "pkey": "", "replication_tls_ca": "",
             "replication_sync_timeout": REPLICATION_SYNC_TIMEOUT_SECONDS}


# Environment prefixes, the first winning where a flag is set under both: ours, then immudb's.
ENV_PREFIXES = ("IMMUCORE_", "IMMUDB_")


def resolve(args, environ=os.environ, warn=None) -> dict:
    """Merge command line, IMMUCORE_*/IMMUDB_* environment and the TOML file into one options
    dict.

    Every spelling of a flag works in all three: ``--signingKey`` is ``IMMUCORE_SIGNINGKEY``
    (or ``IMMUCORE_SIGNING_KEY``, ``IMMUDB_SIGNINGKEY``) and ``signingKey`` (or
    ``signing_key``) in the file, and a replication flag's seed-guide name works as well as
    immudb's current one. Reported through ``warn`` (stderr by default) and ignored: a key of
    the file that is no flag, an ``IMMUDB_`` variable that is no flag (immudb ignores what it
    does not know: a config written for immudb still starts), and every variable of a flag
    beside the one that won (``IMMUDB_PORT`` when ``IMMUCORE_PORT`` is set too)."""
    warn = warn or (lambda text: print(f"immucore: {text}", file=sys.stderr))
    file_values, config = {}, args.config or _environment(
        environ, {_key("config")}, lambda text: text, warn)
    if config:
        try:
            import tomllib
        except ModuleNotFoundError:        # Python 3.10: the same parser, as its backport
            import tomli as tomllib
        with open(config, "rb") as f:
            written = tomllib.load(f)
        file_values = {_key(k): v for k, v in written.items()}
    options, known = {}, {_key("config")}
    for dest in list(_DEFAULTS) + [f"repl_{s}" for s, *_ in REPLICATION_FLAGS]:
        keys = {_key(name) for name in _flag_names(dest)}
        known |= keys
        value = getattr(args, dest, None)
        if value is None:
            value = _environment(environ, keys, functools.partial(_convert, dest), warn)
        if value is None:
            value = next((file_values[k] for k in sorted(keys) if k in file_values), None)
        if value is None:
            value = _DEFAULTS.get(dest)
        options[dest.removeprefix("repl_")] = value
    unknown = sorted(k for k in written if _key(k) not in known) if config else []
    if unknown:
        warn(f"{config}: ignoring keys that are no immucore flag: " + ", ".join(unknown))
    known_variables = {prefix + k for prefix in ENV_PREFIXES for k in known}
    strangers = sorted(name for name in environ if name.startswith("IMMUDB_")
                       and name not in known_variables)
    if strangers:
        warn("ignoring environment variables that are no immucore flag: "
             + ", ".join(strangers))
    return options


def _environment(environ, keys, convert, warn):
    """The value of the first variable set (not empty) among ``keys`` under each prefix in
    ``ENV_PREFIXES`` order, converted; every other one that is set is reported as ignored.
    A value that does not convert names its variable."""
    names = [prefix + k for prefix in ENV_PREFIXES for k in sorted(keys)
             if environ.get(prefix + k, "") != ""]
    if not names:
        return None
    chosen = names[0]
    for other in names[1:]:
        # names only: a value may be a password (IMMUDB_ADMIN_PASSWORD)
        warn(f"ignoring {other}: {chosen} is set too and wins")
    try:
        return convert(environ[chosen])
    except (ValueError, argparse.ArgumentTypeError) as exc:
        raise ValueError(f"environment variable {chosen}: {exc}") from None


def _key(name: str) -> str:
    """One form for a flag's name wherever it is written: ``signingKey``, ``SIGNING-KEY`` and
    ``signing_key`` differ, ``--replication-is-replica`` and ``replication_is_replica`` do
    not."""
    return name.lstrip("-").replace("-", "_").upper()


def _flag_names(dest: str) -> list:
    """The names ``dest`` goes by: its long option strings, read from the parser (so a flag or
    alias added there needs nothing here), and for the node's own flags its dest too
    (``signing_key`` beside ``--signingKey``)."""
    names = [s for s in _option_strings().get(dest, ()) if s.startswith("--")]
    return names if dest.startswith("repl_") else names + [dest]


@functools.lru_cache(maxsize=None)
def _option_strings() -> dict:
    """dest -> every option string the parser gives it."""
    out: dict = {}
    for action in build_parser()._actions:
        out.setdefault(action.dest, []).extend(action.option_strings)
    return out


def _convert(dest: str, text: str):
    kinds = {s: k for s, _, k, _ in REPLICATION_FLAGS}
    if dest.startswith("repl_"):
        kind = kinds[dest.removeprefix("repl_")]
    else:
        kind = type(_DEFAULTS[dest])
    if kind is bool:
        return parse_bool(text)
    return kind(text)


def main(argv=None) -> int:
    args = build_parser().parse_args(normalize_bool_flags(sys.argv[1:] if argv is None else argv))
    warnings = []                      # logged once the log (maybe --logfile) is set up
    try:
        options = resolve(args, warn=warnings.append)
    except (OSError, ValueError, argparse.ArgumentTypeError) as exc:
        for text in warnings:
            print(f"immucore: {text}", file=sys.stderr)
        print(f"immucore: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, filename=options["logfile"] or None,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for text in warnings:
        log.warning(text)
    from ..server.app import run_node
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:       # uvloop is a dependency; the stdlib loop still works without it
        pass
    return asyncio.run(run_node(options))


if __name__ == "__main__":
    sys.exit(main())
