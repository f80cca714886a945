"""The HTTP front's routes, served by aiohttp on the daemon's event loop.

Each request is validated and queued by the submit op itself (ops.validate, then its
execute with a Context whose sink is this HTTP exchange), so HTTP adds no second serving
path: same queues, priorities, policies and checks as the msgpack socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import inspect
import json
import os
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from ...wire import listen
from ...wire.events import Done, Error, Event, Token
from ...wire.protocol import ProtocolError
from .. import ops, prometheus, views
from . import auth, openai
from .guard import Guard, refusal_bytes
from .refused import refusals

if TYPE_CHECKING:
    from ...core.service import Service

log = structlog.get_logger()

# Our error codes as HTTP statuses (docs/http.md, "Errors").
STATUS = {
    "bad_request": 400, "too_long": 400, "no_such_model": 404, "no_such_request": 404,
    "model_unavailable": 503, "queue_full": 429, "too_many_requests": 429, "forbidden": 403,
    "shutting_down": 503, "too_many_connections": 503, "timeout": 504,
    "deferred_timeout": 504, "cancelled": 409, "model_exists": 409, "worker_died": 500,
    "worker_hung": 500, "handover_failed": 500, "scope_error": 500, "internal": 500,
    "insufficient_memory": 503, "model_unloaded": 503, "not_loaded": 409,
    # HTTP's own
    "invalid_api_key": 401, "body_too_large": 413, "request_timeout": 408,
    "not_found": 404, "method_not_allowed": 405,
}
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 408: "invalid_request_error",
          409: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error"}
RETRY_AFTER_S = "1"
_CLOSE = ("request_timeout", "body_too_large")  # errors after which the connection closes
# Where aiohttp's parser errors quote the input (b'...' in 3.14, bytearray(b'...') in 3.8).
_QUOTE = re.compile(r""":?\s*(?:bytearray\()?b['"]|:?\n""")


class HttpError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def error_body(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape; param is the request field a 400 is about."""
    status = STATUS.get(code, 500)
    param = openai.FIELDS.get(param, param)  # the body's name of an op field
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"),
                      "param": param if status == 400 else None, "code": code}}


def error_response(code: str, message: str, request_id: str | None = None,
                   param: str | None = None) -> web.Response:
    headers = {"Retry-After": RETRY_AFTER_S} if STATUS.get(code) == 429 else {}
    if request_id:
        headers["X-Request-Id"] = request_id
    resp = web.json_response(error_body(code, message, param), status=STATUS.get(code, 500),
                             headers=headers)
    if code in _CLOSE:
        resp.force_close()  # the rest of the body is not worth reading
    return resp


class _Protocol(web.RequestHandler):
    """aiohttp's protocol object, answering the errors it answers itself in our shape.

    A request aiohttp cannot parse (a bad request line, a header line over 8 KiB, bad
    chunked encoding, Content-Length with Transfer-Encoding) never reaches a handler or
    the middleware: aiohttp answers it with a text/plain 400 and logs a traceback at
    error level. Here it is a 400 bad_request in OpenAI's JSON and an http_refused line.
    An exception that escapes a handler (a 500) keeps aiohttp's traceback in the log and
    gets a JSON body too. aiohttp has no hook for these (aio-libs/aiohttp#3287); its
    handle_error(request, status, exc, message) is the same from 3.8 to 3.14.
    """

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:  # ours: logged with its traceback; raises if a reply has begun
            super().handle_error(request, status, exc, message)
            code, text = ("timeout", "the request handler timed out") if status == 504 \
                else ("internal", "internal error (the daemon's log has the traceback)")
        else:
            if request.writer.output_size > 0:
                raise ConnectionError("a response was sent already")
            # The parser's message, up to the bytes it quotes: the reason, not the input.
            reason = _QUOTE.split(str(message or exc or "bad request"), maxsplit=1)[0][:200]
            code, text = "bad_request", f"the request is not valid HTTP: {reason}"
            refusals.log(status, code, None, None, self.transport, reason)
        resp = web.json_response(error_body(code, text), status=status)
        resp.force_close()
        return resp


async def _closing(request: web.Request, resp: web.Response) -> web.Response:
    """Send resp now and close: aiohttp would otherwise linger 10 s reading the unread
    body of a slow or oversized request."""
    await resp.prepare(request)
    await resp.write_eof()
    if request.transport is not None:
        request.transport.close()
    return resp


def _refused(request: web.Request, code: str, message: str) -> None:
    """A request refused before acceptance leaves an http_refused line (rate-limited)."""
    refusals.log(STATUS.get(code, 500), code, request.method, request.path, request.transport,
                 message)


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class HttpFront:
    """The HTTP API on a Unix socket and, when configured, on TCP."""

    def __init__(self, service: Service, path: Path | None,
                 sock: socket.socket | None = None) -> None:
        self.service = service
        self.cfg = service.config.http
        self.path = path  # None: no Unix socket (http.socket = "none" and none activated)
        self.activated = sock
        self.keys = (listen.load_keys(Path(self.cfg.api_keys_file))
                     if self.cfg.api_keys_file else {})
        self.guards: dict[Any, Guard] = {}  # by transport
        self.servers: list[asyncio.AbstractServer] = []
        app = web.Application(client_max_size=self.cfg.max_body, middlewares=[self._middleware])
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        kw: dict[str, Any] = {}
        if "handler_cancellation" in inspect.signature(web.AppRunner.__init__).parameters:
            kw["handler_cancellation"] = True  # aiohttp >= 3.9; 3.8 always cancels
        # A connection's protocol object (_Protocol) is made by _factory, with these.
        self.handler_kw = {"access_log": None, "keepalive_timeout": self.cfg.keepalive_timeout}
        self.runner = web.AppRunner(app, handle_signals=False, **self.handler_kw, **kw)

    # -- listening ---------------------------------------------------------------

    def _factory(self) -> Guard:
        limit = self.service.config.daemon.max_connections
        inner = _Protocol(self.runner.server, loop=asyncio.get_running_loop(), **self.handler_kw)
        return Guard(self.guards, self.service.stop_request, inner, limit, self.cfg.header_timeout)

    async def start(self) -> None:
        from ..server import _remove_stale

        await self.runner.setup()
        loop = asyncio.get_running_loop()
        backlog = self.service.config.daemon.max_connections
        if self.activated is not None:
            self.servers.append(await loop.create_unix_server(
                self._factory, sock=self.activated, backlog=backlog)
                if self.activated.family == socket.AF_UNIX else
                await loop.create_server(self._factory, sock=self.activated, backlog=backlog))
        elif self.path is not None:
            dcfg = self.service.config.daemon
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale(self.path)
            self.servers.append(await loop.create_unix_server(
                self._factory, path=str(self.path), backlog=backlog))
            os.chmod(self.path, int(dcfg.socket_mode, 8))
            if dcfg.socket_group:
                os.chown(self.path, -1, grp.getgrnam(dcfg.socket_group).gr_gid)
        if self.cfg.listen:
            host, port = listen.split_listen(self.cfg.listen)
            self.servers.append(await loop.create_server(self._factory, host, port,
                                                         backlog=backlog))

    def addresses(self) -> list[str]:
        out = []
        for server in self.servers:
            for s in server.sockets:
                name = s.getsockname()
                out.append(name if isinstance(name, str) else f"{name[0]}:{name[1]}")
        return out

    async def stop_listening(self) -> None:
        for server in self.servers:
            server.close()
        if self.activated is None and self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def close(self, timeout: float = 2.0) -> None:
        """After fail_all: the handlers end with shutting_down; then close connections."""
        if self.runner.server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.runner.server.shutdown(timeout), timeout + 1)
        for guard in list(self.guards.values()):
            guard.close()
        await self.runner.cleanup()

    # -- per request ---------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        guard = self.guards.get(request.transport)
        if guard is not None:
            guard.request_started()
        try:
            request["peer"] = self._peer(request)
            return await handler(request)
        except ProtocolError as exc:
            _refused(request, exc.code, exc.message)
            return error_response(exc.code, exc.message, param=exc.param)
        except HttpError as exc:
            _refused(request, exc.code, exc.message)
            resp = error_response(exc.code, exc.message)
            return await _closing(request, resp) if exc.code in _CLOSE else resp
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed",
                    413: "body_too_large"}.get(exc.status, "bad_request")
            message = f"{request.method} {request.path}: {exc.reason}"
            _refused(request, code, message)
            return error_response(code, message)
        finally:
            if guard is not None:
                guard.request_finished()

    def _peer(self, request: web.Request) -> auth.Peer:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None and sock.family == socket.AF_UNIX:
            return auth.unix_peer(sock)  # the socket file's mode and group admit peers
        if self.keys and request.path != "/health":
            name = auth.key_name(self.keys, request.headers.get("Authorization"))
            if name is None:
                raise HttpError("invalid_api_key", "a valid API key is required "
                                "(Authorization: Bearer KEY)")
            return auth.Peer(uid=auth.TCP_UID, gid=-1, pid=-1, name=name)
        return auth.Peer(uid=auth.TCP_UID, gid=-1, pid=-1, name="tcp")

    async def _json(self, request: web.Request) -> Any:
        limit = self.cfg.max_body
        if request.content_length is not None and request.content_length > limit:
            raise HttpError("body_too_large", f"the body of {request.content_length} bytes "
                            f"is over http.max_body ({limit})")
        try:
            async with asyncio.timeout(self.cfg.header_timeout):
                raw = await request.read()
        except TimeoutError:
            raise HttpError("request_timeout", "the body did not arrive within "
                            f"{self.cfg.header_timeout} s") from None
        except web.HTTPRequestEntityTooLarge:
            raise HttpError("body_too_large", f"the body is over http.max_body ({limit} "
                            "bytes)") from None
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:  # digits past int's limit too
            raise HttpError("bad_request", f"the body is not valid JSON: {exc}") from None
        except RecursionError:
            raise HttpError("bad_request", "the body is not valid JSON: it nests arrays and "
                            "objects deeper than the parser goes") from None

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        return await self._generate(request, body, openai.chat_submit(
            body, request.headers.get("X-Priority")), chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        return await self._generate(request, body, openai.completion_submit(
            body, request.headers.get("X-Priority")), chat=False)

    async def _generate(self, request: web.Request, body: dict[str, Any],
                        msg: dict[str, Any], chat: bool) -> web.StreamResponse:
        peer: auth.Peer = request["peer"]
        events: asyncio.Queue[Event] = asyncio.Queue()
        accepted: dict[str, Any] = {}
        tracked = []

        def track(req: Any) -> None:
            req.sink = events.put_nowait
            tracked.append(req)

        op = ops.OPS["submit"]
        args = ops.validate(op, msg)  # the msgpack API's own checks
        ctx = ops.Context(service=self.service, uid=peer.uid, gid=peer.gid, pid=peer.pid,
                          send=accepted.update, track=track)
        reply = op.execute(ctx, args)
        if inspect.isawaitable(reply):
            await reply
        req = tracked[0]
        log.info("http_request", request=req.id, path=request.path, stream=body.get("stream",
                 False), **peer.log_fields)
        guard = self.guards.get(request.transport)
        if guard is not None:
            guard.requests.add(req.id)
        shape = openai.Shape(chat, req.id, accepted["model"])
        try:
            if body.get("stream"):
                options = body.get("stream_options") or {}
                return await self._stream(request, req.id, events, shape,
                                          bool(options.get("include_usage")))
            parts = []
            while True:
                event = await events.get()
                if isinstance(event, Token):
                    parts.append(event.text)
                elif isinstance(event, Done):
                    return web.json_response(shape.reply("".join(parts), event.stats),
                                             headers={"X-Request-Id": req.id})
                elif isinstance(event, Error):
                    return error_response(event.error.code, event.error.message, req.id,
                                          param=shape.param(event.error))
        finally:
            if guard is not None:
                guard.requests.discard(req.id)
            if req.id in self.service.requests:  # the client went away (or we failed)
                with contextlib.suppress(ProtocolError):
                    self.service.stop_request(req.id, "cancelled", "the HTTP client went away")

    async def _stream(self, request: web.Request, request_id: str,
                      events: asyncio.Queue[Event], shape: openai.Shape,
                      include_usage: bool) -> web.StreamResponse:
        """SSE: headers with the first token, so an error before it gets its own status."""
        resp: web.StreamResponse | None = None
        while True:
            event = await events.get()
            if isinstance(event, Error) and resp is None:
                return error_response(event.error.code, event.error.message, request_id,
                                      param=shape.param(event.error))
            if not isinstance(event, Token | Done | Error):
                continue  # loading, preempted: the answer comes later
            if resp is None:
                resp = web.StreamResponse(headers={
                    "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                    "X-Request-Id": request_id})
                await resp.prepare(request)
                await resp.write(_sse(shape.chunk("", first=True)) if shape.chat else b"")
            if isinstance(event, Token):
                await resp.write(_sse(shape.chunk(event.text, tokens=event.tokens)))
            elif isinstance(event, Done):
                await resp.write(_sse(shape.chunk(None, event.stats["finish_reason"])))
                if include_usage:
                    await resp.write(_sse(shape.usage_chunk(event.stats)))
                await resp.write(b"data: [DONE]\n\n")
                await resp.write_eof()
                return resp
            else:  # an error after the stream started: an error event, then the end
                await resp.write(_sse(error_body(event.error.code, event.error.message,
                                                 shape.param(event.error))))
                await resp.write_eof()
                return resp

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            self._model(name) for name in self.service.config.models]})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name not in self.service.config.models:
            raise ProtocolError("no_such_model", f"no model {name!r}")
        return web.json_response(self._model(name))

    def _model(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "llm-residentd",
                "state": views.model_state(self.service, name)}

    async def health(self, request: web.Request) -> web.Response:
        states = {m: views.model_state(self.service, m) for m in self.service.config.models}
        # A model on demand serves too: its first request loads it.
        ready = any(s in ("ready", "unloaded") for s in states.values()) and not self.service.stopping
        return web.json_response({"status": "ok" if ready else "unavailable",
                                  "models": states}, status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        body, content_type = prometheus.render(self.service)
        return web.Response(body=body, headers={"Content-Type": content_type})


__all__ = ["HttpFront", "refusal_bytes"]
