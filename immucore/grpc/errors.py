"""immucore's errors as immudb's gRPC status codes and texts.

immudb's server returns most errors as plain Go errors, which gRPC sends as UNKNOWN with the
error's text (``key not found``, ``tx not found``, ``database is read-only because it's a
replica``); its own ``errors.New`` without a code is INTERNAL (``permission denied``); a few are
explicit statuses (``Logged in user does not have permission on this database``:
PERMISSION_DENIED; illegal arguments: INVALID_ARGUMENT; an unknown database: NOT_FOUND). The
texts are immucore's, which keep immudb's (immucore/errors.py, server/auth.py).
"""
from __future__ import annotations

import logging

import grpc

from ..errors import IllegalArgumentsError, ImmucoreError
from ..server import auth

log = logging.getLogger("immucore.grpc")


class StatusError(ImmucoreError):
    """A refusal immudb answers with a status code of its own rather than UNKNOWN: the class's
    ``code``, or the one given."""
    code = grpc.StatusCode.UNKNOWN

    def __init__(self, text: str, code: "grpc.StatusCode" = None):
        super().__init__(text)
        if code is not None:
            self.code = code


class NotLoggedInError(ImmucoreError):
    """No token or session id, or one the node does not know (logged out, expired)."""

    def __init__(self, message: str = "not logged in"):
        super().__init__(message)


class SessionNotFoundError(ImmucoreError):
    """A ``sessionid`` that names no live session (immudb's session interceptor's text)."""

    def __init__(self, message: str = "session not found"):
        super().__init__(message)


class NoDatabaseSelectedError(ImmucoreError):
    """A token from Login before UseDatabase: immudb's tokens name no database until then."""

    def __init__(self, message: str = "please select a database first"):
        super().__init__(message)


class DatabaseNotFoundError(ImmucoreError):
    """UseDatabase of a database that does not exist: immudb's text and NOT_FOUND."""

    def __init__(self, name: str):
        super().__init__(f"'{name}' does not exist")


class NotSupportedError(ImmucoreError):
    """A request field immucore does not implement yet, named in the text."""


class ProtectedModeError(ImmucoreError):
    """A non-loopback call while a user still holds a well-known password (the native port's
    rule and text: server/node.py ``protected_mode_message``)."""


def grpc_status(exc: BaseException) -> tuple:
    """(grpc.StatusCode, text) for an exception raised while serving a call."""
    if isinstance(exc, StatusError):
        return exc.code, str(exc)
    if isinstance(exc, ProtectedModeError):
        return grpc.StatusCode.PERMISSION_DENIED, str(exc)
    if isinstance(exc, auth.NoDatabasePermissionError):
        return grpc.StatusCode.PERMISSION_DENIED, str(exc)
    if isinstance(exc, auth.PermissionDeniedError):
        return grpc.StatusCode.INTERNAL, str(exc)       # immudb's errors.New("permission denied")
    if isinstance(exc, (IllegalArgumentsError, NotSupportedError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, DatabaseNotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, ImmucoreError):
        return grpc.StatusCode.UNKNOWN, str(exc)
    if isinstance(exc, (ValueError, TypeError, OverflowError)):
        # a value protobuf accepted that the embedded API does not (e.g. a negative offset)
        return grpc.StatusCode.INVALID_ARGUMENT, f"illegal arguments: {exc}"
    log.exception("gRPC call failed", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"
