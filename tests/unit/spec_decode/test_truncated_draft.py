"""The early-exit draft (truncated_draft.py): the target's first N layers, final norm and head."""
from __future__ import annotations

import pytest
import torch

from kvserve.spec_decode.dense_runner import DenseModelRunner
from kvserve.spec_decode.truncated_draft import write_truncated_draft
from tests.helpers.tiny_models import build_tiny_model


def test_truncated_draft_is_the_targets_first_layers(tmp_path):
    """Its logits are HF's target hidden state after layer N, through the final norm and head."""
    from transformers import AutoModelForCausalLM

    target = build_tiny_model("llama-tied", tmp_path / "target", seed=3, overrides={"num_hidden_layers": 3})
    draft = write_truncated_draft(target, tmp_path / "draft", 2)
    ids = torch.tensor([[5, 17, 99, 3, 250, 17, 99]])
    hf = AutoModelForCausalLM.from_pretrained(str(target), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        h = hf(ids, output_hidden_states=True).hidden_states[2]  # after layers 0 and 1
        want = hf.lm_head(hf.model.norm(h))[0]
    runner = DenseModelRunner.load(draft)
    assert runner.cfg.num_layers == 2
    got = runner.extend(runner.new_sequence(), ids[0].tolist())
    assert torch.allclose(got, want, atol=1e-4)
    with pytest.raises(ValueError, match="layers must be in"):
        write_truncated_draft(target, tmp_path / "bad", 4)


def test_layer_skipping_draft_keeps_the_chosen_layers_in_order(tmp_path):
    from safetensors import safe_open

    from kvserve.spec_decode.truncated_draft import parse_layers

    assert parse_layers("0-2,5,7-8") == [0, 1, 2, 5, 7, 8]
    with pytest.raises(ValueError, match="layer list"):
        parse_layers("0-a")
    target = build_tiny_model("llama-tied", tmp_path / "target", seed=3, overrides={"num_hidden_layers": 3})
    draft = write_truncated_draft(target, tmp_path / "skip", layers=[0, 2])
    with safe_open(str(target / "model.safetensors"), "pt") as t, safe_open(str(draft / "model.safetensors"), "pt") as d:
        assert not any(".layers.2." in k for k in d.keys())
        for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(d.get_tensor(f"model.layers.1.{name}"), t.get_tensor(f"model.layers.2.{name}"))
            assert torch.equal(d.get_tensor(f"model.layers.0.{name}"), t.get_tensor(f"model.layers.0.{name}"))
    assert DenseModelRunner.load(draft).cfg.num_layers == 2
    with pytest.raises(ValueError, match="layer ids"):
        write_truncated_draft(target, tmp_path / "bad2", layers=[0, 3])
