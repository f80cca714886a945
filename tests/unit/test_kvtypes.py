"""KV cache types (models.NAME.cache_type_k/v): the table against ggml itself, the config's
checks (each refused case names its key), and --check-config on a model whose head size a
quantized type cannot hold."""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
import pytest
import tinymodel
from llm_residentd import main as daemon_main
from llm_residentd.catalog import modeladmin
from llm_residentd.catalog.config import ConfigError, ModelConfig, parse
from llm_residentd.wire.kvtypes import KV_TYPES, misfit
from llm_residentd.wire.protocol import ProtocolError

# llama-server's --cache-type-k/-v list (common/arg.cpp kv_cache_types), in its order
LLAMA_SERVER_TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]


def _ggml() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    for name, restype in (("ggml_type_size", ctypes.c_size_t), ("ggml_blck_size", ctypes.c_int64),
                          ("ggml_type_name", ctypes.c_char_p), ("ggml_is_quantized", ctypes.c_bool)):
        getattr(lib, name).restype = restype
        getattr(lib, name).argtypes = [ctypes.c_int]
    return lib


def test_the_table_is_llama_servers_list_with_ggmls_sizes():
    assert list(KV_TYPES) == LLAMA_SERVER_TYPES
    ggml = _ggml()
    for name, kv in KV_TYPES.items():
        assert ggml.ggml_type_name(kv.ggml).decode() == name
        assert (ggml.ggml_blck_size(kv.ggml), ggml.ggml_type_size(kv.ggml)) == (kv.block, kv.size)
        assert ggml.ggml_is_quantized(kv.ggml) == kv.quantized
        if hasattr(llama_cpp, f"GGML_TYPE_{name.upper()}"):  # llama-cpp-python lacks BF16
            assert getattr(llama_cpp, f"GGML_TYPE_{name.upper()}") == kv.ggml


@pytest.mark.parametrize(("name", "per_64"), [("f32", 256), ("f16", 128), ("bf16", 128),
                                              ("q8_0", 68), ("q4_0", 36), ("q4_1", 40),
                                              ("iq4_nl", 36), ("q5_0", 44), ("q5_1", 48)])
def test_bytes_of_a_row_of_64_elements(name, per_64):
    assert KV_TYPES[name].row_bytes(64) == per_64


def test_a_quantized_type_needs_heads_its_block_divides():
    assert misfit("K", KV_TYPES["q8_0"], {64, 128}) == ""
    assert misfit("K", KV_TYPES["f16"], {16}) == ""
    why = misfit("V", KV_TYPES["q4_0"], {16, 64})
    assert why.startswith("q4_0 packs a V head into blocks of 32 elements, and this model's "
                          "V heads have 16") and "f32, f16, bf16 fit any head size" in why


# -- the config ---------------------------------------------------------------------------


def _model(**table: object) -> ModelConfig:
    return parse({"models": {"m": {"path": "/m.gguf", **table}}}, "t").models["m"]


def test_the_default_is_f16_for_both():
    model = _model()
    assert (model.cache_type_k, model.cache_type_v) == ("f16", "f16") and model.flash_attn


@pytest.mark.parametrize("name", LLAMA_SERVER_TYPES)
def test_every_type_of_the_list_is_accepted_for_k_and_v(name):
    model = _model(cache_type_k=name, cache_type_v=name)
    assert (model.cache_type_k, model.cache_type_v) == (name, name)


@pytest.mark.parametrize("name", ["f32", "f16", "bf16"])
def test_float_types_need_no_flash_attention(name):
    assert _model(cache_type_v=name, flash_attn=False).cache_type_v == name


def test_a_quantized_k_cache_needs_no_flash_attention():
    """llama.cpp runs it without (only a quantized V cache needs flash attention)."""
    assert _model(cache_type_k="q8_0", flash_attn=False).cache_type_k == "q8_0"


@pytest.mark.parametrize(("table", "words"), [
    ({"cache_type_k": "q8"}, "models.m.cache_type_k: 'q8' is not one of 'f32', 'f16', "
     "'bf16', 'q8_0', 'q4_0', 'q4_1', 'iq4_nl', 'q5_0', 'q5_1'"),
    ({"cache_type_v": "Q8_0"}, "models.m.cache_type_v: 'Q8_0' is not one of 'f32'"),
    ({"cache_type_k": "q4_k"}, "models.m.cache_type_k: 'q4_k' is not one of"),
    ({"cache_type_v": 8}, "models.m.cache_type_v: expected str, got int"),
    ({"cache_type_v": "q8_0", "flash_attn": False},
     "models.m.cache_type_v: 'q8_0' is quantized, and llama.cpp keeps a quantized V cache "
     "only with flash attention: set models.m.flash_attn = true, or cache_type_v to one of "
     "f32, f16, bf16"),
    ({"cache_type_k": "q4_0", "cache_type_v": "q4_0", "flash_attn": False},
     "models.m.cache_type_v: 'q4_0' is quantized"),
])
def test_refused_types_name_the_key(table, words):
    with pytest.raises(ConfigError) as err:
        _model(**table)
    assert str(err.value).startswith(words), str(err.value)


def test_models_add_refuses_as_the_config_file_does():
    """`llmctl models add --set` goes through the same checker."""
    with pytest.raises(ProtocolError) as err:
        modeladmin.build("x", "/m.gguf", {"cache_type_v": "q5_1", "flash_attn": False})
    assert err.value.code == "bad_request"
    assert err.value.message.startswith("models.x.cache_type_v: 'q5_1' is quantized")
    assert modeladmin.build("x", "/m.gguf", {"cache_type_k": "q8_0"}).cache_type_k == "q8_0"


# -- --check-config -------------------------------------------------------------------------


def _check(tmp_path: Path, capsys: pytest.CaptureFixture[str], table: str) -> tuple[int, str, str]:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[models.x]\n{table}\n')
    code = daemon_main.main(["--config", str(cfg), "--check-config"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_check_config_refuses_a_flash_attention_less_quantized_v_cache(tmp_path, capsys,
                                                                       tiny_model_path):
    code, out, err = _check(tmp_path, capsys, f'path = "{tiny_model_path}"\n'
                            'cache_type_v = "q8_0"\nflash_attn = false')
    assert code == 2 and "config OK" not in out
    assert "config error: " in err and "models.x.cache_type_v: 'q8_0' is quantized" in err


def test_check_config_reads_the_head_size_from_the_gguf(tmp_path, capsys, tiny_model_path):
    """The tiny model's heads have 16 elements: q8_0's blocks of 32 cannot hold them."""
    code, out, err = _check(tmp_path, capsys, f'path = "{tiny_model_path}"\n'
                            'cache_type_k = "q8_0"')
    assert code == 2 and "config OK" not in out
    assert ("models.x.cache_type_k: q8_0 packs a K head into blocks of 32 elements, and "
            "this model's K heads have 16" in err), err
    code, out, err = _check(tmp_path, capsys, f'path = "{tiny_model_path}"\n'
                            'cache_type_v = "iq4_nl"')
    assert code == 2 and "models.x.cache_type_v: iq4_nl packs a V head" in err, err


def test_check_config_passes_types_that_fit(tmp_path, capsys):
    path = tinymodel.write_tiny_model(tmp_path / "h32.gguf", n_embd=64, n_head=2)  # heads of 32
    code, out, err = _check(tmp_path, capsys, f'path = "{path}"\ncache_type_k = "q8_0"\n'
                            'cache_type_v = "q4_0"')
    assert code == 0 and err == "", err
    assert f"model x: {path}, 1 worker(s), n_ctx 2048, KV cache q8_0/q4_0" in out
