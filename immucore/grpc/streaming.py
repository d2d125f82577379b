"""Serving streamed answers: the counterpart of service.py's ``_served`` for handlers that are
async generators (a server stream: exportTx, streamExportTx, streamGet ...).

An error ends the stream with immudb's status code and text, whatever was sent before it. A
handler given a request stream (replicateTx, streamSet) and answering once is a coroutine that
reads the async iterator it is given (``served_request_stream``).
"""
from __future__ import annotations

import functools

from .errors import grpc_status


def served_request_stream(method):
    """A coroutine handler given a request stream (replicateTx, streamSet): service.py's
    ``_served``, here so that mixins need not import service.py (which imports them)."""
    @functools.wraps(method)
    async def handler(self, request_iterator, context):
        try:
            self._check_peer(context)
            return await method(self, request_iterator, context)
        except Exception as exc:  # noqa: BLE001
            code, text = grpc_status(exc)
        await context.abort(code, text)
    return handler


def served_stream(method):
    """Run an async-generator handler; an error becomes immudb's status code and text."""
    @functools.wraps(method)
    async def handler(self, request, context):
        try:
            self._check_peer(context)
            async for answer in method(self, request, context):
                yield answer
            return
        except Exception as exc:  # noqa: BLE001 - every error is answered, none kills the server
            code, text = grpc_status(exc)
        await context.abort(code, text)
    return handler
