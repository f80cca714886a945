"""Which llama.cpp log lines reach a worker's stderr, and which a failed call is told."""

from __future__ import annotations

import llama_cpp
from llm_residentd.worker import llamalog


def test_warnings_and_errors_reach_stderr_and_errors_are_caught(capsys):
    llamalog.install(llama_cpp)
    with llamalog.errors() as caught:
        llamalog._log(llamalog.DEBUG, b"debug line\n", None)
        llamalog._log(llamalog.INFO, b"info line\n", None)
        llamalog._log(llamalog.WARN, b"n_ctx_seq < n_ctx_train\n", None)
        llamalog._log(llamalog.ERROR, b"gguf_init: bad GGUF version: 0", None)
        llamalog._log(llamalog.CONT, b" (more)\n", None)  # continues the error
        llamalog._log(llamalog.INFO, b"info again\n", None)
        llamalog._log(llamalog.CONT, b"continued info\n", None)  # continues the info
    llamalog._log(llamalog.ERROR, b"after the block\n", None)
    err = capsys.readouterr().err
    assert err == ("n_ctx_seq < n_ctx_train\ngguf_init: bad GGUF version: 0 (more)\n"
                   "after the block\n")
    assert caught == ["gguf_init: bad GGUF version: 0", " (more)\n"]
    assert llamalog.reason(caught) == "gguf_init: bad GGUF version: 0 (more)"


def test_a_real_failed_load_names_llama_cpps_reason(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 100)
    llamalog.install(llama_cpp)
    with llamalog.errors() as caught:
        assert not llama_cpp.llama_model_load_from_file(str(bad).encode(),
                                                        llama_cpp.llama_model_default_params())
    assert "bad GGUF version: 0" in llamalog.reason(caught), caught


def test_reason_drops_repeats_and_bounds_the_length():
    assert llamalog.reason(["a: x\n", "a: x\n", "b\n"]) == "a: x; b"
    assert len(llamalog.reason(["y" * 5000])) == 600
    assert llamalog.reason([]) == ""


def test_nested_blocks_each_catch_and_end_in_any_order():
    llamalog.install(llama_cpp)
    with llamalog.errors() as outer:
        with llamalog.errors() as inner:  # an adapter loaded while the model loads
            llamalog._log(llamalog.ERROR, b"e1\n", None)
        llamalog._log(llamalog.ERROR, b"e2\n", None)
    llamalog._log(llamalog.ERROR, b"e3\n", None)
    assert (outer, inner) == (["e1\n", "e2\n"], ["e1\n"])


def test_a_grammar_check_leaves_the_workers_log_callback_in_place(tiny_model_path, tmp_path):
    from llama_cpp import _internals
    from llm_residentd.worker import grammars

    llamalog.install(llama_cpp)
    model = _internals.LlamaModel(path_model=str(tiny_model_path), verbose=False,
                                  params=llama_cpp.llama_model_default_params())
    try:
        why = grammars.check(llama_cpp, model.vocab, 'start ::= "a"')
    finally:
        model.close()
    assert "grammar does not contain a 'root' symbol" in why, why
    # llama-cpp-python's own callback (stale levels) would drop this error again.
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 100)
    with llamalog.errors() as caught:
        llama_cpp.llama_model_load_from_file(str(bad).encode(), llama_cpp.llama_model_default_params())
    assert "bad GGUF version: 0" in llamalog.reason(caught), caught
