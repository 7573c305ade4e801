"""The C++ decoder stack (kvserve.worker.cpu_decoder_stack) equals the Python layers it replaces:
step by step in a running engine (hidden states and every KV cache write, bit for bit), through
decodes, chunked prefills after a prefix and mixed steps; and it is attached only where its parts
are there."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.models import cpu_linear_rows, llama
from kvserve.protocol import ForwardContext
from kvserve.worker import cpu_decoder_stack
from tests.helpers.tiny_models import build_tiny_model

native = cpu_decoder_stack.load()
pytestmark = pytest.mark.skipif(native is None, reason="the CPU decoder stack cannot be built here")

PROMPTS = [{"prompt_token_ids": [(7 * i + 3) % 500 for i in range(41)]},  # 41 tokens: several chunks
           {"prompt_token_ids": [8, 8, 1]},
           {"prompt_token_ids": [(5 * i + 11) % 500 for i in range(19)]}]


def _run_both_paths(model_dir: Path, monkeypatch: pytest.MonkeyPatch, exact: bool,
                    plain_from_rows: str = "off") -> list[tuple[int, int, bool, int]]:
    """Generate with every step run twice from the same state, by the stack and by the Python
    layers (on a copy of the KV caches), and compare; returns (decodes, prefill chunks, whether
    a chunk started after a cached prefix, tokens) per step.  `plain_from_rows`: the projections'
    KVSERVE_CPU_LINEAR_ROWS (MKL from that many rows; "off": the blocked kernel throughout)."""
    steps: list[tuple[int, int, bool, int]] = []
    monkeypatch.setenv(cpu_linear_rows.ENV, plain_from_rows)
    forward = llama.LlamaForCausalLM.forward

    def both(self: Any, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        stack = self.decoder_stack
        assert stack is not None and ctx.backend is stack.backend
        before = [c.clone() for c in ctx.kv_caches]
        fast = forward(self, input_ids, positions, ctx)
        ref_ctx = ForwardContext(backend=ctx.backend, kv_caches=before, meta=ctx.meta)
        self.decoder_stack = None  # the Python layers, on the copy
        try:
            ref = forward(self, input_ids, positions, ref_ctx)
        finally:
            self.decoder_stack = stack
        if exact:
            assert torch.equal(fast, ref)
            for a, b in zip(ctx.kv_caches, before):
                assert torch.equal(a, b)
        else:
            torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
            for a, b in zip(ctx.kv_caches, before):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        meta = ctx.meta
        steps.append((meta.num_decode_tokens, len(meta.prefills), any(p.start_pos > 0 for p in meta.prefills),
                      input_ids.shape[0]))
        return fast

    monkeypatch.setattr(llama.LlamaForCausalLM, "forward", both)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with LLM(str(model_dir), num_kv_blocks=64, block_size=8, max_num_batched_tokens=16) as llm:
        model = llm.engine.core.model
        assert model.decoder_stack is not None
        expected = None if plain_from_rows == "off" else int(plain_from_rows)
        assert all(layer.mlp.down_proj.plain_from_rows == expected for layer in model.layers)
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 12 for o in outs)
    return steps


# llama3: GQA and llama3 rope scaling; qwen2: a qkv bias; llama-tied: a tied head.
@pytest.mark.parametrize("name", ["llama3", "qwen2", "llama-tied"])
def test_stack_equals_python_layers_bit_for_bit(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = _run_both_paths(build_tiny_model(name, tmp_path / name, seed=5), monkeypatch, exact=True)
    assert any(d > 0 and p == 0 for d, p, _, _ in steps)  # decode-only steps
    assert any(d > 0 and p > 0 for d, p, _, _ in steps)  # mixed steps
    assert any(after_prefix for _, _, after_prefix, _ in steps)  # chunks after their own prefix


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_stack_with_mkl_at_prefill_sizes_equals_python_layers(name: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # MKL from 5 rows: the 16-token chunked steps take F.linear on the plain weights, steps of up
    # to 3 decodes the blocked kernel; both paths switch at the same row count, bit for bit.
    steps = _run_both_paths(build_tiny_model(name, tmp_path / name, seed=5), monkeypatch, exact=True,
                            plain_from_rows="5")
    assert any(tokens >= 5 for *_, tokens in steps) and any(tokens < 5 for *_, tokens in steps)


def test_stack_with_qk_norms_equals_python_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Qwen3: per-head q/k RMSNorm (C++ here, torch ops in the Python layers): equal up to rounding.
    steps = _run_both_paths(build_tiny_model("qwen3", tmp_path / "qwen3", seed=5), monkeypatch, exact=False)
    assert any(d > 0 for d, *_ in steps)


def test_stack_off_gives_the_same_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = build_tiny_model("llama3", tmp_path / "m", seed=9)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv(cpu_decoder_stack.ENV, flag)
        with LLM(str(d), num_kv_blocks=64, block_size=8) as llm:
            assert (llm.engine.core.model.decoder_stack is not None) == (flag == "1")
            outs[flag] = llm.generate(PROMPTS, params, use_tqdm=False)
    for on, off in zip(outs["1"], outs["0"]):
        assert on.outputs[0].token_ids == off.outputs[0].token_ids
        assert on.outputs[0].logprobs == off.outputs[0].logprobs  # same bits, so the same floats


def test_not_attached_without_its_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = build_tiny_model("llama3", tmp_path / "m", seed=1)
    with LLM(str(d), num_kv_blocks=16, block_size=8, attention_backend="torch") as llm:
        assert llm.engine.core.model.decoder_stack is None  # the torch attention backend
    monkeypatch.setenv("KVSERVE_CPU_FUSED", "0")
    with LLM(str(d), num_kv_blocks=16, block_size=8) as llm:
        assert llm.engine.core.model.decoder_stack is None  # no fused layer ops
    monkeypatch.delenv("KVSERVE_CPU_FUSED")
    monkeypatch.setenv("KVSERVE_CPU_LINEAR", "onednn")
    with LLM(str(d), num_kv_blocks=16, block_size=8) as llm:
        assert llm.engine.core.model.decoder_stack is None  # projections not in column blocks


def test_bad_step_inputs_are_clear_errors(tmp_path: Path) -> None:
    d = build_tiny_model("llama3", tmp_path / "m", seed=2)
    with LLM(str(d), num_kv_blocks=16, block_size=8) as llm:
        core = llm.engine.core
        stack = core.model.decoder_stack.native
        caches = core.runner.kv_caches
        cfg = core.arch
        h = torch.randn(2, cfg.hidden_size)
        cos = sin = torch.ones(2, cfg.head_dim)
        empty = torch.empty(0, dtype=torch.int64)
        tables = torch.zeros(2, 1, dtype=torch.int64)
        lens = torch.ones(2, dtype=torch.int64)
        with pytest.raises(RuntimeError, match="slot out of range"):
            stack.forward(h, cos, sin, caches, torch.tensor([0, 10**6]), 2, tables, lens, empty, empty)
        with pytest.raises(RuntimeError, match="no prefill chunks"):
            stack.forward(h, cos, sin, caches, torch.tensor([0, 1]), 1, tables[:1], lens[:1], empty, empty)
        with pytest.raises(RuntimeError, match="one KV cache per layer"):
            stack.forward(h, cos, sin, caches[:1], torch.tensor([0, 1]), 2, tables, lens, empty, empty)
        # The engine still serves after the rejected calls.
        out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(temperature=0, max_tokens=3),
                           use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 3
