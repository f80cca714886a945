"""llm-residentd: local LLMs as a well-behaved resident OS service."""

__version__ = "0.1.0"
