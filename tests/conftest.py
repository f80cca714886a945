"""Shared pytest fixtures."""

from __future__ import annotations

import pathlib
import sys

import pytest

# Make helper modules in tests/ (e.g. tinymodel) importable from any test.
TESTS_DIR = pathlib.Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import tinymodel  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A tiny random-weight llama GGUF model, written once per test session."""
    return tinymodel.write_tiny_model(tmp_path_factory.mktemp("tinymodel") / "tiny.gguf")



@pytest.fixture(scope="session")
def tiny_chat_model_path(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The tiny model with a ChatML chat template in its GGUF."""
    return tinymodel.write_tiny_model(tmp_path_factory.mktemp("tinychat") / "chat.gguf",
                                      chat_template=tinymodel.CHATML)


@pytest.fixture(scope="session")
def tiny_family_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """The tiny model once per chat template family (chatml, gemma, llama3), each with its
    template's markers as control tokens."""
    folder = tmp_path_factory.mktemp("tinyfamilies")
    return {family: tinymodel.write_tiny_model(folder / f"{family}.gguf", chat_template=template,
                                               special_tokens=tinymodel.MARKERS[family])
            for family, template in tinymodel.TEMPLATES.items()}
