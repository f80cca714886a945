"""Generate a tiny random-weight llama-architecture GGUF model for tests.

The model is a real llama graph (RMS norm, RoPE attention, SwiGLU FFN) with
an SPM ("llama") tokenizer over a small English vocabulary, so llama.cpp
loads it, tokenizes words into whole-word tokens and generates quickly.
The generated text is garbage; only the mechanics are meant to be real.

Residual channel 0 carries a constant that the blocks neither read nor write,
which gives the output layer a per-token bias: <unk>, <s>, </s> and the byte
tokens are pushed far down, so sampling emits only printable word pieces and
never stops by itself (force a stop with logit_bias={EOS_ID: 100.0}). Byte
tokens would otherwise produce broken UTF-8, and llama-cpp-python then
generates past max_tokens while it waits for the character to complete.

Usage: python tests/tinymodel.py OUT.gguf [--layers N] [--embd N] ...
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
from collections.abc import Sequence

import gguf
import numpy as np

ARCH = "llama"
SPIECE = "\u2581"  # SentencePiece word-boundary marker "▁"

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
FIRST_PIECE_ID = 3 + 256  # after <unk> <s> </s> and the 256 byte tokens

# Words that tokenize to single tokens; every "▁"-prefixed prefix of each word
# is in the vocabulary too, because SPM only merges pairs that are in it.
_WORD_TEXT = """
    a about after again all an and answer any are as ask at back be because
    before big blue brown but by can cat come could day do dog down each
    even every first for fox from get give go good great had has have he
    hello help her here him his how i if in into is it its jumps just know
    lazy like little long look make man many me model more most my new no
    not now of old on one only or other our out over people please question
    quick red say see she so some story take tell test than thank that the
    their them then there these they thing think this time to two up us use
    very want was way we well were what when which who will with word work
    world would write year yes you your
"""
WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())

LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
OTHER_CHARS = "0123456789.,!?;:'\"-()[]{}/\\*+=<>@#$%&_|~`^"

WEIGHT_STD = np.float32(0.02)  # small weights keep activations finite
BIAS_CHANNEL = 0  # residual channel that holds a constant 1.0 (see above)
SUPPRESS_WEIGHT = np.float32(-2.0)  # output weight on it for suppressed tokens


# ChatML, as SmolLM2's template renders it (without its default system prompt).
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


# Gemma 3's template (google/gemma-3-*-it), for string contents: the system message
# leads the first user turn, the assistant is "model", and every content is trimmed.
GEMMA = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# Llama 3's template (Meta-Llama-3-8B-Instruct), as it is: bos_token, then per message a
# header and the trimmed content. Its real BOS text is <|begin_of_text|>; the tiny model's
# is <s>.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}"
          "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
          "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")

# Each template's markers, as control tokens for write_tiny_model(special_tokens=...).
MARKERS = {"chatml": ("<|im_start|>", "<|im_end|>"),
           "gemma": ("<start_of_turn>", "<end_of_turn>"),
           "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                      "<|eot_id|>")}
TEMPLATES = {"chatml": CHATML, "gemma": GEMMA, "llama3": LLAMA3}


def chatml(messages: list[dict[str, str]]) -> str:
    """What CHATML renders for messages, with the generation prompt: written out by hand,
    so that a test checks the worker's rendering against something it did not run."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                   for m in messages) + "<|im_start|>assistant\n"


def build_vocab(special_tokens: Sequence[str] = ()) -> tuple[list[str], list[float], list[int]]:
    """Return (tokens, scores, token_types) of the tiny SPM vocabulary, with
    special_tokens as control tokens at its end."""
    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    types: list[int] = [
        gguf.TokenType.UNKNOWN,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
    ]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256

    # Normal pieces: lone marker, single characters, then word prefixes.
    pieces: list[str] = [SPIECE]
    pieces += list(LETTERS) + list(OTHER_CHARS)
    pieces += [SPIECE + c for c in LETTERS + OTHER_CHARS]
    for word in WORDS:
        for i in range(2, len(word) + 1):
            pieces.append(SPIECE + word[:i])
    seen: set[str] = set()
    unique = [p for p in pieces if not (p in seen or seen.add(p))]
    tokens += unique
    types += [gguf.TokenType.NORMAL] * len(unique)

    # Control/byte tokens score 0; longer pieces score higher so that SPM
    # prefers them (merge order does not matter much: merges only ever extend
    # a "▁"-prefix by one character).
    scores = [0.0] * FIRST_PIECE_ID + [float(len(p)) - 100.0 for p in unique]
    tokens += special_tokens
    scores += [0.0] * len(special_tokens)
    types += [gguf.TokenType.CONTROL] * len(special_tokens)
    return tokens, scores, [int(t) for t in types]


def _tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...],
            n_special: int = 0) -> np.ndarray:
    """Weights for one tensor (numpy shape = (out_features, in_features)); the last
    n_special tokens of the vocabulary are control tokens, suppressed as the first are."""
    if name.endswith("norm.weight"):
        t = np.ones(shape, dtype=np.float32)
        if name != "output_norm.weight":
            t[BIAS_CHANNEL] = 0.0  # blocks do not read the bias channel
        return t
    t = rng.standard_normal(shape, dtype=np.float32) * WEIGHT_STD
    if name == "token_embd.weight":
        t[:, BIAS_CHANNEL] = 1.0
    elif name.endswith(("attn_output.weight", "ffn_down.weight")):
        t[BIAS_CHANNEL, :] = 0.0  # blocks do not write the bias channel
    elif name == "output.weight":
        t[:FIRST_PIECE_ID, BIAS_CHANNEL] = SUPPRESS_WEIGHT  # control and byte tokens
        if n_special:
            t[-n_special:, BIAS_CHANNEL] = SUPPRESS_WEIGHT
    return t


def write_tiny_model(
    path: str | os.PathLike[str],
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_ff: int = 128,
    n_ctx_train: int = 4096,
    seed: int = 0,
    chat_template: str | None = None,
    special_tokens: Sequence[str] = (),
) -> pathlib.Path:
    """Write a random-weight llama GGUF model to ``path`` and return its path.

    special_tokens are control tokens appended to the vocabulary (a chat template's
    markers, e.g. MARKERS["chatml"]); without them the file is what it always was.

    Output is byte-for-byte deterministic for the same arguments. The file is
    written to a temporary name and renamed into place, so concurrent readers
    never see a partial model.
    """
    if n_layer < 1 or n_embd < 1 or n_head < 1 or n_ff < 1 or n_ctx_train < 1:
        raise ValueError("model dimensions must be positive")
    if n_embd % n_head:
        raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
    head_dim = n_embd // n_head
    if head_dim % 2:
        raise ValueError(f"head dim n_embd/n_head ({head_dim}) must be even for RoPE")

    out = pathlib.Path(path)
    tokens, scores, types = build_vocab(special_tokens)
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    fd, tmp_name = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp_name, ARCH)
        w.add_name("tiny-random-llama")
        w.add_file_type(gguf.LlamaFileType.ALL_F32)

        # Hyperparameters (llama.* keys).
        w.add_vocab_size(n_vocab)
        w.add_context_length(n_ctx_train)
        w.add_embedding_length(n_embd)
        w.add_block_count(n_layer)
        w.add_feed_forward_length(n_ff)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(10000.0)

        # Tokenizer (SentencePiece-style, llama.cpp "llama" vocab type).
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_unk_token_id(UNK_ID)
        w.add_bos_token_id(BOS_ID)
        w.add_eos_token_id(EOS_ID)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        if chat_template is not None:
            w.add_chat_template(chat_template)

        # Tensors, F32: norm weights are ones, the rest small random values.
        # Only shapes are registered up front; data is streamed one tensor at
        # a time so large configurations do not need the whole model in RAM.
        # numpy shapes are the reverse of ggml's ne: (out_features, in_features).
        specs: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (n_vocab, n_embd))]
        for i in range(n_layer):
            p = f"blk.{i}."
            specs += [
                (p + "attn_norm.weight", (n_embd,)),
                (p + "attn_q.weight", (n_embd, n_embd)),
                (p + "attn_k.weight", (n_embd, n_embd)),
                (p + "attn_v.weight", (n_embd, n_embd)),
                (p + "attn_output.weight", (n_embd, n_embd)),
                (p + "ffn_norm.weight", (n_embd,)),
                (p + "ffn_gate.weight", (n_ff, n_embd)),
                (p + "ffn_up.weight", (n_ff, n_embd)),
                (p + "ffn_down.weight", (n_embd, n_ff)),
            ]
        specs += [("output_norm.weight", (n_embd,)), ("output.weight", (n_vocab, n_embd))]
        f32 = np.dtype(np.float32)
        for name, shape in specs:
            w.add_tensor_info(name, shape, f32, int(np.prod(shape)) * f32.itemsize)

        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for name, shape in specs:
                w.write_tensor_data(_tensor(rng, name, shape, len(special_tokens)))
        finally:
            w.close()
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600
        os.replace(tmp_name, out)
    except BaseException:
        pathlib.Path(tmp_name).unlink(missing_ok=True)
        raise
    return out


LORA_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
LORA_STD = np.float32(0.3)  # A and B: the update B @ A is then about as large as the weights


def tiny_shapes(*, n_layer: int = 2, n_embd: int = 64, n_ff: int = 128,
                n_embd_kv: int | None = None, n_vocab: int | None = None,
                ) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each block matrix of a tiny model (or of any llama
    model with these sizes), by tensor name; with n_vocab, output.weight too."""
    kv = n_embd_kv or n_embd
    dims = {"attn_q": (n_embd, n_embd), "attn_k": (kv, n_embd), "attn_v": (kv, n_embd),
            "attn_output": (n_embd, n_embd), "ffn_gate": (n_ff, n_embd),
            "ffn_up": (n_ff, n_embd), "ffn_down": (n_embd, n_ff)}
    shapes = {f"blk.{i}.{t}.weight": dims[t] for i in range(n_layer) for t in LORA_TARGETS}
    if n_vocab:
        shapes["output.weight"] = (n_vocab, n_embd)
    return shapes


def write_lora(path: str | os.PathLike[str], shapes: dict[str, tuple[int, int]], *,
               rank: int = 4, alpha: float | None = None, seed: int = 0,
               std: float = float(LORA_STD)) -> pathlib.Path:
    """Write a random LoRA adapter GGUF for the base matrices `shapes` (name ->
    (out_features, in_features)), as convert_lora_to_gguf.py lays one out: general.type
    "adapter", adapter.type "lora", adapter.lora.alpha, and per matrix NAME.lora_a of
    numpy shape (rank, in) and NAME.lora_b of (out, rank); llama.cpp checks those shapes
    against the base model's tensor of that name (llama-adapter.cpp). The update is
    B @ A x alpha / rank; alpha defaults to rank (scale 1). The matrices that write the
    residual leave its bias channel alone, and output.weight's leaves the suppressed
    tokens (see the module docstring) suppressed."""
    out = pathlib.Path(path)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(out), ARCH)
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(alpha if alpha is not None else rank))
    for name, (n_out, n_in) in shapes.items():
        a = rng.standard_normal((rank, n_in), dtype=np.float32) * np.float32(std)
        b = rng.standard_normal((n_out, rank), dtype=np.float32) * np.float32(std)
        if name.endswith(("attn_output.weight", "ffn_down.weight")):
            b[BIAS_CHANNEL, :] = 0.0
        elif name == "output.weight":
            b[:FIRST_PIECE_ID, :] = 0.0
        stem = name.removesuffix(".weight")
        w.add_tensor(f"{stem}.weight.lora_a", a)
        w.add_tensor(f"{stem}.weight.lora_b", b)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def write_tiny_lora(path: str | os.PathLike[str], *, n_layer: int = 2, n_embd: int = 64,
                    n_ff: int = 128, rank: int = 4, seed: int = 0) -> pathlib.Path:
    """A LoRA adapter for the tiny model of these sizes (write_tiny_model's defaults);
    other sizes make an adapter that llama.cpp refuses for the default tiny model. The
    tiny model's text comes mostly from its output layer (its blocks' weights are small),
    so the adapter changes output.weight as well as the blocks."""
    shapes = tiny_shapes(n_layer=n_layer, n_embd=n_embd, n_ff=n_ff,
                         n_vocab=len(build_vocab()[0]))
    return write_lora(path, shapes, rank=rank, seed=seed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write a tiny random-weight llama GGUF model.")
    ap.add_argument("out", help="output .gguf path")
    ap.add_argument("--layers", type=int, default=2, help="number of blocks (default 2)")
    ap.add_argument("--embd", type=int, default=64, help="embedding size (default 64)")
    ap.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    ap.add_argument("--ff", type=int, default=128, help="feed-forward size (default 128)")
    ap.add_argument("--ctx", type=int, default=4096, help="training context length (default 4096)")
    ap.add_argument("--seed", type=int, default=0, help="RNG seed (default 0)")
    ap.add_argument("--chat-template", default=None, help="Jinja chat template text")
    ap.add_argument("--chat-template-file", default=None, help="read the chat template from a file")
    args = ap.parse_args(argv)

    template = args.chat_template
    if args.chat_template_file is not None:
        template = pathlib.Path(args.chat_template_file).read_text(encoding="utf-8")

    path = write_tiny_model(
        args.out,
        n_layer=args.layers,
        n_embd=args.embd,
        n_head=args.heads,
        n_ff=args.ff,
        n_ctx_train=args.ctx,
        seed=args.seed,
        chat_template=template,
    )
    print(f"{path} {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
