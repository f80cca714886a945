"""Built-in resource policies (registered through the llm_residentd.policies entry points)."""
