"""The tiny random-weight test model loads, tokenizes and generates in llama.cpp."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import llama_cpp
import numpy as np
import pytest
import tinymodel

SENTENCE = "the quick brown fox jumps over the lazy dog"
FIRST_NORMAL_ID = tinymodel.FIRST_PIECE_ID


def load(path: pathlib.Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=1, verbose=False)


@pytest.fixture(scope="module")
def llm(tiny_model_path: pathlib.Path) -> Iterator[llama_cpp.Llama]:
    model = load(tiny_model_path)
    yield model
    model.close()


def test_write_is_deterministic(tmp_path: pathlib.Path) -> None:
    a = tinymodel.write_tiny_model(tmp_path / "a.gguf", seed=7)
    b = tinymodel.write_tiny_model(tmp_path / "b.gguf", seed=7)
    c = tinymodel.write_tiny_model(tmp_path / "c.gguf", seed=8)
    assert a == tmp_path / "a.gguf"
    assert a.read_bytes()[:4] == b"GGUF"
    assert a.read_bytes() == b.read_bytes()
    assert a.stat().st_size == c.stat().st_size
    assert a.read_bytes() != c.read_bytes()
    # Only the final files remain (temporary file was renamed into place).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf", "c.gguf"]


def test_loads_with_expected_shape(llm: llama_cpp.Llama) -> None:
    tokens, _, _ = tinymodel.build_vocab()
    assert llm.n_vocab() == len(tokens)
    assert llm.n_embd() == 64
    assert llm.token_bos() == tinymodel.BOS_ID
    assert llm.token_eos() == tinymodel.EOS_ID
    assert llm.metadata["general.architecture"] == "llama"
    assert llm.metadata["llama.block_count"] == "2"
    assert llm.metadata["llama.context_length"] == "4096"
    assert "tokenizer.chat_template" not in llm.metadata


def test_listed_words_are_single_tokens_and_round_trip(llm: llama_cpp.Llama) -> None:
    ids = llm.tokenize(SENTENCE.encode())
    words = SENTENCE.split()
    assert ids[0] == tinymodel.BOS_ID
    assert len(ids) == 1 + len(words)
    assert all(i >= FIRST_NORMAL_ID for i in ids[1:]), "listed words fell back to bytes"
    assert [llm.detokenize([i]) for i in ids[1:]] == [f" {w}".encode() for w in words]
    assert ids[1] == ids[7]  # both "the"
    # With the BOS first, detokenize drops the SPM leading space again.
    assert llm.detokenize(ids) == SENTENCE.encode()


@pytest.mark.parametrize("text", ["Hello, World! 42", "zebra xylophone", " hello  world\n"])
def test_other_text_round_trips_via_letters_and_bytes(llm: llama_cpp.Llama, text: str) -> None:
    ids = llm.tokenize(text.encode())
    assert tinymodel.UNK_ID not in ids
    assert llm.detokenize(ids) == text.encode()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_generates_16_tokens(llm: llama_cpp.Llama, seed: int) -> None:
    out = llm.create_completion("hello world", max_tokens=16, seed=seed)
    assert out["usage"]["prompt_tokens"] == 3
    assert out["usage"]["completion_tokens"] == 16
    assert out["choices"][0]["finish_reason"] == "length"
    text = out["choices"][0]["text"]
    # Only word pieces are sampled (byte tokens are suppressed): printable text.
    assert text.strip()
    assert text.isprintable()


def test_stop_can_be_forced_with_logit_bias(llm: llama_cpp.Llama) -> None:
    out = llm.create_completion("hello world", max_tokens=16, seed=0, logit_bias={tinymodel.EOS_ID: 100.0})
    assert out["usage"]["completion_tokens"] == 0
    assert out["choices"][0]["finish_reason"] == "stop"


def test_logits_are_finite_and_vary(tiny_model_path: pathlib.Path) -> None:
    # llama-cpp-python 0.3.x only copies logits into .scores with logits_all.
    model = llama_cpp.Llama(
        model_path=str(tiny_model_path), n_ctx=512, n_threads=1, logits_all=True, verbose=False
    )
    try:
        ids = model.tokenize(SENTENCE.encode())
        model.eval(ids)
        logits = model.scores[: model.n_tokens]
        assert logits.shape == (len(ids), model.n_vocab())
        assert bool(np.isfinite(logits).all())
        assert all(float(row.max()) > float(row.min()) for row in logits)
        # Control and byte tokens sit far below every word piece.
        assert float(logits[:, :FIRST_NORMAL_ID].max()) < float(logits[:, FIRST_NORMAL_ID:].min()) - 5
    finally:
        model.close()


def test_custom_size_and_chat_template(tmp_path: pathlib.Path) -> None:
    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    small = tinymodel.write_tiny_model(tmp_path / "small.gguf")
    path = tinymodel.write_tiny_model(
        tmp_path / "custom.gguf",
        n_layer=3,
        n_embd=96,
        n_head=6,
        n_ff=192,
        n_ctx_train=2048,
        seed=3,
        chat_template=template,
    )
    assert path.stat().st_size > small.stat().st_size
    model = load(path)
    try:
        assert model.n_embd() == 96
        assert model.metadata["llama.block_count"] == "3"
        assert model.metadata["llama.attention.head_count"] == "6"
        assert model.metadata["llama.feed_forward_length"] == "192"
        assert model.metadata["llama.context_length"] == "2048"
        assert model.metadata["tokenizer.chat_template"] == template
        out = model.create_chat_completion(
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=4,
            seed=0,
        )
        assert out["usage"]["completion_tokens"] == 4
        assert out["choices"][0]["message"]["role"] == "assistant"
    finally:
        model.close()


@pytest.mark.parametrize("family", sorted(tinymodel.TEMPLATES))
def test_special_tokens_are_control_tokens_that_are_never_sampled(
        tiny_family_paths: dict[str, pathlib.Path], family: str) -> None:
    """A template's markers are single control tokens at the end of the vocabulary, text
    when special tokens are not parsed, and suppressed like the other control tokens."""
    markers = tinymodel.MARKERS[family]
    n_base = len(tinymodel.build_vocab()[0])
    model = load(tiny_family_paths[family])
    try:
        assert model.n_vocab() == n_base + len(markers)
        for i, marker in enumerate(markers):
            assert model.tokenize(marker.encode(), add_bos=False, special=True) == [n_base + i]
            assert len(model.tokenize(marker.encode(), add_bos=False, special=False)) > 3
        assert model.metadata["tokenizer.chat_template"] == tinymodel.TEMPLATES[family]
        out = model.create_completion("hello world", max_tokens=16, seed=0)
        ids = model.tokenize(out["choices"][0]["text"].encode(), add_bos=False, special=True)
        assert out["usage"]["completion_tokens"] == 16 and max(ids) < n_base
    finally:
        model.close()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_embd": 65}, "divisible"),
        ({"n_embd": 36, "n_head": 4}, "even"),
        ({"n_layer": 0}, "positive"),
    ],
)
def test_rejects_bad_dimensions(tmp_path: pathlib.Path, kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tinymodel.write_tiny_model(tmp_path / "bad.gguf", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_tiny_lora_is_an_adapter_with_the_base_shapes(tmp_path: pathlib.Path) -> None:
    """The keys llama-adapter.cpp checks, and lora_a (rank, in) / lora_b (out, rank) per
    base matrix; the suppressed tokens' output rows are left alone."""
    import gguf

    path = tinymodel.write_tiny_lora(tmp_path / "l.gguf", rank=4, seed=3)
    reader = gguf.GGUFReader(path)

    def text(key: str) -> str:
        field = reader.fields[key]
        return bytes(field.parts[field.data[0]]).decode()

    assert text("general.type") == "adapter" and text("adapter.type") == "lora"
    assert text("general.architecture") == "llama"
    assert float(reader.fields["adapter.lora.alpha"].parts[-1][0]) == 4.0
    tensors = {t.name: t for t in reader.tensors}
    n_vocab = len(tinymodel.build_vocab()[0])
    for name, (n_out, n_in) in tinymodel.tiny_shapes(n_vocab=n_vocab).items():
        stem = name.removesuffix(".weight")
        a, b = tensors[f"{stem}.weight.lora_a"], tensors[f"{stem}.weight.lora_b"]
        assert list(a.shape) == [n_in, 4] and list(b.shape) == [4, n_out]  # ggml order
    out_b = tensors["output.weight.lora_b"].data
    assert not out_b[:FIRST_NORMAL_ID].any() and out_b[FIRST_NORMAL_ID:].any()
