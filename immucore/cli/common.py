"""What ``immuadmin`` and ``immuclient`` share: connection flags, the saved session (token file),
password input, tables and the one-line error report.

A login opens a *detached* session on the node; its token is saved (mode 0600) with the server's
address and port, and every later command binds a new connection to it (``Client.resume``).
When the session ends on the node (a restart, a change of the user), the file keeps the node's
address without the token: later commands still go to that node (and say so) until a login
replaces it, instead of falling back to the default address.
``IMMUCORE_CLI_HOME``, when set, replaces the home directory for the token and state files.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import getpass
import json
import os
import sys
from typing import Callable, Iterator, List, Optional, Sequence

from ..client import AsyncClient, Client, ConnectionClosedError
from ..durable_file import replace_durably
from ..errors import ImmucoreError
from .flags import normalize_bool_flags

ADDRESS_DEFAULT = "127.0.0.1"
PORT_DEFAULT = 3322
SECRET_SIZE_BYTES_MAX = 1024      # a password line longer than this is refused before sending
# node errors meaning "the saved session is gone": the token file is stale
SESSION_GONE_CODES = frozenset({"session_not_found", "not_logged_in", "user_not_active"})


class CliError(Exception):
    """A failure reported as one line ``<prog>: <message>`` on stderr, exit code 1."""


def home_dir() -> str:
    return os.environ.get("IMMUCORE_CLI_HOME") or os.path.expanduser("~")


def home_path(name: str) -> str:
    """``name`` if absolute, else ``name`` inside the (CLI) home directory."""
    return name if os.path.isabs(name) else os.path.join(home_dir(), name)


# --- flags ----------------------------------------------------------------------------------

def add_connection_flags(parser: argparse.ArgumentParser, tokenfile_default: str, *,
                         subcommand: bool = False):
    """Add ``-a``, ``-p`` and ``--tokenfile``. On subcommands (``subcommand=True``) they default
    to SUPPRESS, so they may be given before or after the command without clobbering."""
    def default(value):
        return argparse.SUPPRESS if subcommand else value

    parser.add_argument("-a", "--immudb-address", dest="address", default=default(None),
                        help=f"node address (default {ADDRESS_DEFAULT}, or the logged-in one)")
    parser.add_argument("-p", "--immudb-port", dest="port", type=int, default=default(None),
                        help=f"node port (default {PORT_DEFAULT}, or the logged-in one)")
    parser.add_argument("--tokenfile", default=default(tokenfile_default),
                        help=f"session token file, relative to the home directory "
                             f"(default ~/{tokenfile_default})")
    parser.add_argument("--tls-ca", dest="tls_ca", default=default(None),
                        help="connect with TLS, verifying the node's certificate against this "
                             "CA file (PEM)")


def common_parent(tokenfile_default: str, extra: Optional[Callable] = None):
    """A parent parser carrying the connection flags for every subcommand."""
    parent = argparse.ArgumentParser(add_help=False)
    add_connection_flags(parent, tokenfile_default, subcommand=True)
    if extra is not None:
        extra(parent, subcommand=True)
    return parent


# --- passwords --------------------------------------------------------------------------------

def read_secrets(prompts: Sequence[str]) -> List[str]:
    """One secret per prompt: ``getpass`` on a terminal, else one line each from stdin."""
    out = []
    for prompt in prompts:
        if sys.stdin.isatty():
            secret = getpass.getpass(prompt + " ")
        else:
            line = sys.stdin.readline()
            if not line:
                raise CliError(f"no input for '{prompt}' (stdin is closed)")
            secret = line.rstrip("\r\n")
        if len(secret.encode("utf-8", "surrogateescape")) > SECRET_SIZE_BYTES_MAX:
            raise CliError(f"password longer than {SECRET_SIZE_BYTES_MAX} bytes")
        out.append(secret)
    return out


def new_password(given: Optional[str],
                 prompts: Sequence[str] = ("Password:", "Confirm password:")) -> str:
    """A new password from ``--password`` or entered twice (terminal or two stdin lines)."""
    if given is not None:
        return given
    password, confirmation = read_secrets(prompts)
    if password != confirmation:
        raise CliError("passwords don't match")
    return password


# --- the saved session ------------------------------------------------------------------------

class Session:
    """The token file of one CLI and the connection it resumes."""

    def __init__(self, args):
        self.path = home_path(args.tokenfile)
        self.address, self.port = args.address, args.port
        self.tls = tls_context(getattr(args, "tls_ca", None))
        self.user = self.database = None         # set by resumed()

    def load(self) -> Optional[dict]:
        try:
            with open(self.path) as f:
                saved = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise CliError(f"unreadable token file {self.path}: {exc}") from None
        if not isinstance(saved, dict) or not {"address", "port"} <= saved.keys():
            raise CliError(f"malformed token file {self.path}: please login again")
        return saved

    def saved_session(self) -> dict:
        """The saved session, for the node the flags name; else why not, naming the node."""
        saved = self.load()
        address, port = self.server(saved)
        if saved is None:
            raise CliError(f"please login first (node {address}:{port})")
        if (address, port) != (saved["address"], saved["port"]):
            raise CliError(f"please login first (the saved session is for "
                           f"{saved['address']}:{saved['port']})")
        if not saved.get("token"):
            raise CliError(f"the session ended: please login again (node {address}:{port})")
        return saved

    def save(self, address: str, port: int, answer: dict):
        record = {"address": address, "port": port, "token": answer["token"],
                  "user": answer["user"], "database": answer["database"]}
        replace_durably(self.path, json.dumps(record).encode(), 0o600)

    def remove(self):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def ended(self):
        """The session ended on the node: forget its token, keep its node's address."""
        try:
            saved = self.load()
        except CliError:
            saved = None
        if saved is None:
            return
        record = {"address": saved["address"], "port": saved["port"]}
        replace_durably(self.path, json.dumps(record).encode(), 0o600)

    def server(self, saved: Optional[dict] = None):
        """The node to talk to: the flags, else the saved session's node, else the defaults."""
        saved = saved or {}
        return (self.address or saved.get("address") or ADDRESS_DEFAULT,
                self.port or saved.get("port") or PORT_DEFAULT)

    @contextlib.contextmanager
    def resumed(self, **client_options) -> Iterator[Client]:
        """A client bound to the saved session (``please login first`` without one)."""
        saved = self.saved_session()
        address, port = self.server(saved)
        with connected(address, port, ssl=self.tls, **client_options) as client:
            try:
                answer = client.resume(saved["token"])
            except ImmucoreError as exc:
                if getattr(exc, "code", None) in SESSION_GONE_CODES:
                    self.ended()
                    raise CliError(f"{exc}: please login again (node {address}:{port})") \
                        from None
                raise
            self.user, self.database = answer["user"], answer["database"]
            yield client

    def login(self, user: str, password: str, database: str) -> dict:
        """Open a detached session, save its token, then close the session it replaces (so
        repeated logins do not pile up sessions on the node)."""
        try:
            previous = self.load()
        except CliError:               # a damaged token file is simply replaced
            previous = None
        address, port = self.server(previous)    # the flags, else the last session's node
        with connected(address, port, ssl=self.tls) as client:
            answer = client.login(user, password, database, detached=True)
            self.save(address, port, answer)
            if previous and (previous["address"], previous["port"]) == (address, port) \
                    and previous.get("token") and previous["token"] != answer["token"]:
                with contextlib.suppress(ImmucoreError):
                    client.resume(previous["token"])
                    client.logout()
        return answer

    def logout(self):
        try:
            saved = self.load()
            if saved is not None and not saved.get("token"):
                return                 # the session ended already: only its node is forgotten
            with self.resumed() as client:
                client.logout()
        finally:
            self.remove()


def tls_context(ca_file: Optional[str]):
    """A client TLS context trusting ``ca_file`` (None: plain TCP)."""
    if not ca_file:
        return None
    import ssl
    return ssl.create_default_context(cafile=ca_file)


def connect_failure(address: str, port: int, exc: OSError, what: str = "") -> CliError:
    """The one-line report of a connection that could not be made to ``address:port``
    (``what`` names the node's role: "the primary")."""
    node = f"{what} {address}:{port}" if what else f"{address}:{port}"
    if isinstance(exc, ConnectionRefusedError):
        return CliError(f"could not connect to {node}: connection refused "
                        "(is the node running?)")
    if isinstance(exc, TimeoutError):
        return CliError(f"could not connect to {node}: timed out")
    return CliError(f"could not connect to {node}: "
                    f"{getattr(exc, 'strerror', None) or str(exc) or type(exc).__name__}")


@contextlib.contextmanager
def connected(address: str, port: int, **client_options) -> Iterator[Client]:
    try:
        client = Client(address, port, **client_options)
    except OSError as exc:
        raise connect_failure(address, port, exc) from None
    try:
        yield client
    except (TimeoutError, ConnectionClosedError) as exc:    # unanswered: say which node
        raise CliError(f"{exc or type(exc).__name__} (node {address}:{port})") from None
    finally:
        client.close()


# --- output and the command loop ---------------------------------------------------------------

def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]):
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]
    for row in (headers, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def cmd_login(args):
    password, = read_secrets(("Password:",))      # asked before connecting
    answer = Session(args).login(args.user, password, args.database)
    print("logged in")
    if answer.get("warning"):
        print(f"SECURITY WARNING: {answer['warning']}", file=sys.stderr)


def cmd_logout(args):
    Session(args).logout()
    print("logged out")


def cmd_status(args):
    show_status(Session(args))


def show_status(session: Session):
    """Health and version of the node; then the saved session's user, database and state."""
    saved = session.load()
    address, port = session.server(saved)
    with connected(address, port, ssl=session.tls) as client:
        health, info = client.health(), client.server_info()
    print(f"OK - {address}:{port} is reachable and responding to queries")
    print(f"status:   {health.get('status', '?')}")
    print(f"version:  {info.get('version', '?')}")
    if info.get("started_at"):
        print(f"up since: {time_text(info['started_at'])}")
    if info.get("uptime_seconds") is not None:
        print(f"uptime:   {duration_text(info['uptime_seconds'])}")
    try:
        with session.resumed() as client:
            state = client.current_state()
    except (CliError, ImmucoreError) as exc:
        print(f"session:  {exc}")
        return
    print(f"user:     {session.user}")
    print(f"database: {state.db}")
    print(f"tx id:    {state.tx_id}")
    print(f"tx hash:  {state.tx_hash.hex()}")


def time_text(value) -> str:
    """Unix seconds or an ISO text, as ``YYYY-MM-DD HH:MM:SS`` UTC (``-`` when unknown)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        moment = datetime.datetime.fromtimestamp(value, datetime.timezone.utc)
        return moment.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, str) and value:
        return value[:19].replace("T", " ")
    return "-"


def duration_text(seconds: float) -> str:
    """Whole seconds as Go prints a duration: ``26h3m4s``, ``3m4s``, ``4s``."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (f"{hours}h{minutes}m{secs}s" if hours else
            f"{minutes}m{secs}s" if minutes else f"{secs}s")


def size_text(size_bytes: int) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    value, unit = float(size_bytes), 0
    while value >= 1024 and unit < len(units) - 1:
        value, unit = value / 1024, unit + 1
    return f"{size_bytes} B" if unit == 0 else f"{value:.1f} {units[unit]}"


def add_help_command(commands, parser: argparse.ArgumentParser, parent):
    """``help X Y`` prints the help of ``X Y`` (``X Y --help``)."""
    sub = commands.add_parser("help", parents=[parent], help="show the help of a command")
    sub.add_argument("topic", nargs="*", metavar="command")
    sub.set_defaults(run=lambda args: parser.parse_args(args.topic + ["--help"]))


def run(prog: str, parser: argparse.ArgumentParser, argv: Optional[List[str]]) -> int:
    """Parse, run the chosen command (``args.run``), report any failure as one line."""
    argv = normalize_bool_flags(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.parse_args(argv + ["--help"])      # a group without its subcommand: its help
    try:
        return args.run(args) or 0
    except (CliError, ImmucoreError, TimeoutError) as exc:   # the node's errors: its message
        print(f"{prog}: {str(exc) or type(exc).__name__}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 1


@contextlib.asynccontextmanager
async def session_client(session, saved: dict, database: str = None, *, created=None,
                         doing: str = None):
    """An AsyncClient on the saved CLI session, moved to ``database`` (after ``created(client)``
    made it, when given) and back to the session's own database at the end: the node keeps one
    database per session token, so a command on another database must not move the user's
    session for good. ``doing`` names the work in a timeout's message (default: the node)."""
    address, port = session.server(saved)
    client = AsyncClient(address, port, ssl=session.tls)
    try:
        try:
            own = (await client.resume(saved["token"]))["database"]
        except OSError as exc:
            raise connect_failure(address, port, exc) from None
        except ImmucoreError as exc:
            if getattr(exc, "code", None) not in SESSION_GONE_CODES:
                raise
            session.ended()
            raise CliError(f"{exc}: please login again (node {address}:{port})") from None
        try:
            if created is not None:
                await created(client)
            if database and database != own:
                await client.use_database(database)
            yield client
        finally:
            if client.database != own:
                with contextlib.suppress(ImmucoreError, OSError, asyncio.TimeoutError):
                    await client.use_database(own)
    except (TimeoutError, asyncio.TimeoutError, ConnectionClosedError) as exc:
        raise CliError(f"{exc or type(exc).__name__} ({doing or 'node'} {address}:{port})") \
            from None
    finally:
        await client.close()
