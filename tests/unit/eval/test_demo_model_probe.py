"""scripts/demo_model_probe.py: the miss classifier, and both probes run on the committed demo model."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "scripts"))

import demo_model_probe as probe  # noqa: E402

DEMO_MODEL = REPO / "kvserve" / "demo_model"
PROMPT = "Below is a list of keys and values.\nABCD: 1234\nABCE: 5678\nQuestion: What is the value of ABCD?"


@pytest.mark.parametrize(("output", "kind"), [
    ("ABCE: 5678", "key_miscopied"),    # wrong key written, then that key's value
    ("ABCD: 5678", "other_line"),       # right key, another line's value
    ("ABCD: 1243", "not_in_context"),   # right key, digits slipped
])
def test_classify_miss(output: str, kind: str) -> None:
    assert probe.classify_miss(PROMPT, "ABCD", output) == kind


def test_probes_run_on_the_demo_model() -> None:
    model, tok = probe.load(str(DEMO_MODEL))
    res = probe.retrieval_misses(model, tok, length=128, num=3, fmt="plain")
    assert sum(res["counts"].values()) == 3 and len(res["miss_depths"]) == 3 - res["counts"]["right"]
    accs = probe.copy_accuracy_by_length(model, tok, [128], rows=2)
    assert len(accs[128]) == 2 and all(0.0 <= a <= 1.0 for a in accs[128])
