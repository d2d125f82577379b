"""The two wrappers of every gRPC handler: the peer check (protected mode) before the call, and
any error answered with immudb's status code and text (errors.py ``grpc_status``), so that no
error kills the server.

``served`` wraps a coroutine handler, whose request is one message or a stream of them
(replicateTx, streamSet); ``served_stream`` an async-generator handler (a server stream:
exportTx, streamExportTx, streamGet ...), where an error ends the stream whatever was sent
before it. Mixins import them from here, not from service.py (which imports the mixins).
"""
from __future__ import annotations

import functools

from .errors import grpc_status


def served(method):
    @functools.wraps(method)
    async def handler(self, request, context):
        try:
            self._check_peer(context)
            return await method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every error is answered, none kills the server
            code, text = grpc_status(exc)
        await context.abort(code, text)
    return handler


def served_stream(method):
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
