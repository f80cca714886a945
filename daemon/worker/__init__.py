"""The worker process, run in its scope as `python -m llm_residentd.worker`: the engine
that owns one llama.cpp model and context, continuous batching, sampling, grammars, KV
state, LoRA adapters, decode stop and stop strings. It speaks to the daemon only through
the messages of wire/messages.py."""
