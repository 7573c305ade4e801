"""kvserve: an LLM serving engine that treats the KV cache as the first-class object."""
from __future__ import annotations

from typing import TYPE_CHECKING

from kvserve.outputs import CompletionOutput, Logprob, RequestOutput
from kvserve.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]


def __getattr__(name: str):
    # LLM pulls in torch and the model code; import it on first use.
    if name == "LLM":
        from kvserve.engine.llm import LLM

        return LLM
    raise AttributeError(name)


if TYPE_CHECKING:
    from kvserve.engine.llm import LLM
