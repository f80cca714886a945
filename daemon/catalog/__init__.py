"""What the daemon may serve: the config file (models, daemon settings, HTTP, policies),
models added and removed at run time, where each model's GGUF file comes from, and what
a GGUF's header says. Read by core/ and front/; it runs nothing."""
