"""llmctl: client library and command line for llm-residentd."""

from .client import Client, LlmctlError, Stream

__all__ = ["Client", "LlmctlError", "Stream"]
