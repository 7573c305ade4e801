"""Where the shared data (traces, prompts, configs, tokenizers) lives.

Order: the KVSERVE_SHARED_DATA environment variable, else `<repo root>/../shared/data`.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "KVSERVE_SHARED_DATA"


def shared_data_dir() -> Path:
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    # parents: [0]=bench, [1]=kvserve, [2]=repo root
    return (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()


TRACE_DATASETS = ("azure-conv", "azure-code", "mooncake", "burstgpt", "trace")
DATASETS = ("random", "sharegpt") + TRACE_DATASETS

# Default files per named dataset, relative to the shared data directory.
DEFAULT_FILES: dict[str, str] = {
    "sharegpt": "prompts/sharegpt/ShareGPT_V3_filtered_500.json",
    "azure-conv": "traces/azure/AzureLLMInferenceTrace_conv.csv",
    "azure-code": "traces/azure/AzureLLMInferenceTrace_code.csv",
    "mooncake": "traces/mooncake/conversation_trace.jsonl",
    "burstgpt": "traces/burstgpt/burstgpt_sample.csv",
}


def default_file(dataset: str) -> Path:
    return shared_data_dir() / DEFAULT_FILES[dataset]
