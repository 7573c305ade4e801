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
