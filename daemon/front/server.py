"""The control socket: framed msgpack over a Unix stream socket, one task per connection."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import inspect
import os
import socket
import struct
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import structlog

from ..core.requests import Request
from ..core.service import Service
from ..wire import events
from ..wire.protocol import HEADER, ProtocolError, check_length, decode, encode
from . import ops
from .fairness import ROOT_RESERVE, ConnectionSlots

log = structlog.get_logger()
SD_LISTEN_FDS_START = 3


def activated_sockets(env: MutableMapping[str, str] | None = None) -> dict[str, socket.socket]:
    """The listening sockets systemd passed (socket activation), by name.

    Like sd_listen_fds(unset_environment=1): only when $LISTEN_PID is this process and
    $LISTEN_FDS >= 1; the variables are cleared and the fds made close-on-exec so workers
    never see them. $LISTEN_FDNAMES (FileDescriptorName= of the .socket units) tells
    "http" from "control"; an fd of any other name, or one passed without names, is the
    control socket (the first such one), as before the HTTP socket existed.
    """
    env = os.environ if env is None else env
    pid, fds = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    if not (pid.isdigit() and int(pid) == os.getpid() and fds.isdigit() and int(fds) >= 1):
        return {}
    names = env.get("LISTEN_FDNAMES", "").split(":")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    found: dict[str, socket.socket] = {}
    for i in range(int(fds)):
        fd = SD_LISTEN_FDS_START + i
        name = names[i] if len(names) == int(fds) else ""
        role = "http" if name == "http" else "control"
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        unix_only = role == "control"
        if (sock.type != socket.SOCK_STREAM or not listening
                or (unix_only and sock.family != socket.AF_UNIX)):
            sock.detach()
            raise RuntimeError(f"the socket passed by systemd (fd {fd}, name {name!r}) is not "
                               f"a listening {'AF_UNIX ' if unix_only else ''}stream socket")
        if role in found:
            sock.detach()  # a second control socket: not ours to serve
            continue
        found[role] = sock
    return found


def activated_socket(env: MutableMapping[str, str] | None = None) -> socket.socket | None:
    """The control socket systemd passed, else None (see activated_sockets)."""
    return activated_sockets(env).get("control")


class Connection:
    def __init__(self, server: Server, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        sock = writer.get_extra_info("socket")
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        self.pid, self.uid, self.gid = struct.unpack("3i", creds)
        self.greeted = False
        self.hello_deadline = time.monotonic() + server.service.config.daemon.hello_timeout
        self.closed = False
        self.gone = "the client disconnected"  # why its requests are cancelled at the end
        self.requests: dict[str, Request] = {}
        self.log = log.bind(peer_pid=self.pid, peer_uid=self.uid)

    def send(self, msg: dict[str, Any]) -> None:
        """Queue a frame on the transport; it is written without waiting for the peer.

        A peer that lets more than client_buffer bytes pile up is disconnected.
        """
        if self.closed or self.writer.is_closing():
            return
        self.writer.write(encode(msg))
        unsent = self.writer.transport.get_write_buffer_size()
        limit = self.server.service.config.daemon.client_buffer
        if unsent > limit:
            self.log.warning("client_not_reading", unsent_bytes=unsent, client_buffer=limit)
            self.gone = f"the client stopped reading ({unsent} bytes unsent)"
            self.writer.transport.abort()  # serve() sees the end of stream and cleans up

    def close(self) -> None:
        """Close after what is queued has been flushed."""
        self.closed = True
        self.writer.close()

    async def _read_body(self) -> bytes | None:
        """One frame body; None at end of stream.

        Until hello succeeds, frames must come before one deadline (hello_timeout from
        connect); a frame, header included, must finish within frame_timeout of its
        first byte. After hello a connection may stay idle between frames.
        """
        cfg = self.server.service.config.daemon
        wait = None if self.greeted else max(0.0, self.hello_deadline - time.monotonic())
        try:
            first = await asyncio.wait_for(self.reader.readexactly(1), wait)
        except asyncio.IncompleteReadError:
            return None
        except TimeoutError:
            raise ProtocolError("handshake_required",
                                f"no hello within {cfg.hello_timeout} s") from None
        try:
            async with asyncio.timeout(cfg.frame_timeout):
                header = first + await self.reader.readexactly(HEADER.size - 1)
                (length,) = HEADER.unpack(header)
                check_length(length, cfg.max_frame)
                return await self.reader.readexactly(length)
        except TimeoutError:
            raise ProtocolError("bad_frame", f"frame not completed within "
                                f"{cfg.frame_timeout} s") from None
        except asyncio.IncompleteReadError:
            raise ProtocolError("bad_frame", "stream ended inside a frame") from None

    async def serve(self) -> None:
        try:
            while not self.closed:
                await self.writer.drain()  # read no more requests while replies pile up
                try:
                    body = await self._read_body()
                except ProtocolError as exc:  # framing is lost: say why and close
                    self.send({"id": None, "ok": False, "error": exc.as_dict()})
                    break
                if body is None:
                    break
                try:
                    msg = decode(body)
                except ProtocolError as exc:  # one bad frame; the next may be fine
                    self.send({"id": None, "ok": False, "error": exc.as_dict()})
                    continue
                if not await self._handle(msg):
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            self._drop_requests()
            self.close()

    async def _handle(self, msg: dict[str, Any]) -> bool:
        """Run one request; False when the connection must close."""
        msg_id = msg.get("id")
        try:
            op = ops.lookup(msg.get("op"))
            if not self.greeted and op.name != "hello":
                raise ProtocolError("handshake_required", "send hello first")
            args = ops.validate(op, msg)
            ctx = ops.Context(service=self.server.service, uid=self.uid, gid=self.gid,
                              pid=self.pid, send=lambda m: self.send({"id": msg_id, **m}),
                              track=lambda r: self._track(msg_id, r))
            reply = op.execute(ctx, args)
            if inspect.isawaitable(reply):
                reply = await reply
            self.greeted = True
            if reply is not None:
                self.send({"id": msg_id, "ok": True, **reply})
        except ProtocolError as exc:
            self.send({"id": msg_id, "ok": False, "error": exc.as_dict()})
            return exc.code != "unsupported_protocol"
        except Exception as exc:
            self.log.exception("op_failed", op=msg.get("op"), code="internal")
            self.send({"id": msg_id, "ok": False, "error": {
                "code": "internal", "message": f"{type(exc).__name__}: {exc} (see the daemon log)"}})
        return True

    def _track(self, msg_id: Any, req: Request) -> None:
        self.requests[req.id] = req

        def sink(event: events.Event) -> None:
            if event.terminal:  # until then, this connection leaving cancels the request
                self.requests.pop(req.id, None)
            self.send({"id": msg_id, "request": req.id, **events.as_map(event)})

        req.sink = sink

    def _drop_requests(self) -> None:
        """A client that goes away cancels what it asked for."""
        for req_id in list(self.requests):
            with contextlib.suppress(ProtocolError):
                self.server.service.stop_request(req_id, "cancelled", self.gone)
        self.requests.clear()


class Server:
    def __init__(self, service: Service, path: Path, sock: socket.socket | None = None) -> None:
        self.service = service
        self.path = path
        self.activated = sock  # passed by systemd: not ours to chmod or unlink
        self.connections: set[Connection] = set()
        self.slots = ConnectionSlots()
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        cfg = self.service.config.daemon
        # A burst of connects beyond the backlog gets EAGAIN (or blocks), so the kernel
        # must queue at least as many as the daemon serves. asyncio calls listen() with
        # it on a socket systemd passed too, which resets that socket's Backlog=.
        backlog = cfg.max_connections + ROOT_RESERVE
        if self.activated is not None:
            # Python 3.13+ would unlink the path on close; systemd owns it.
            keep = {"cleanup_socket": False} if sys.version_info >= (3, 13) else {}
            self._server = await asyncio.start_unix_server(
                self._accept, sock=self.activated, backlog=backlog, **keep)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(self.path)
        self._server = await asyncio.start_unix_server(self._accept, path=str(self.path),
                                                       backlog=backlog)
        os.chmod(self.path, int(cfg.socket_mode, 8))
        if cfg.socket_group:
            os.chown(self.path, -1, grp.getgrnam(cfg.socket_group).gr_gid)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cfg = self.service.config.daemon
        conn = Connection(self, reader, writer)
        refusal = self.slots.refusal(conn.uid, cfg.max_connections, cfg.max_connections_per_uid)
        if refusal is not None:
            conn.log.warning("connection_refused", code="too_many_connections", reason=refusal)
            err = ProtocolError("too_many_connections", refusal)
            writer.write(encode({"id": None, "ok": False, "error": err.as_dict()}))
            with contextlib.suppress(ConnectionError, OSError):
                await writer.drain()
            writer.close()
            return
        self.connections.add(conn)
        self.slots.opened(conn.uid)
        try:
            await conn.serve()
        finally:
            self.connections.discard(conn)
            self.slots.closed(conn.uid)

    async def stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
        if self.activated is None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def close_connections(self, timeout: float = 2.0) -> None:
        """Flush what each connection has queued (final events), then close it."""
        conns = list(self.connections)
        for conn in conns:
            conn.close()
        closing = [asyncio.ensure_future(c.writer.wait_closed()) for c in conns]
        if closing:
            await asyncio.wait(closing, timeout=timeout)


def _remove_stale(path: Path) -> None:
    """Remove a socket file left by a dead daemon; refuse if a live one answers."""
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise RuntimeError(f"another daemon is already serving on {path}")
