"""An LLMEngine with injected faults, loaded in the server's engine process via KVSERVE_ENGINE_FACTORY.

A prompt containing MODEL_FAULT_TOKEN makes the model runner raise (the engine
core then fails that step's requests); one containing STEP_FAULT_TOKEN makes
`step()` itself raise (the engine loop then fails every request it holds).
"""
from __future__ import annotations

from typing import Any

from kvserve.engine.llm_engine import LLMEngine

MODEL_FAULT_TOKEN = 7
STEP_FAULT_TOKEN = 8


class FaultyEngine(LLMEngine):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        runner = self.core.runner
        execute = runner.execute

        def faulty_execute(sched):  # type: ignore[no-untyped-def]
            if any(MODEL_FAULT_TOKEN in r.token_ids for r in sched.requests):
                raise RuntimeError("injected model failure")
            return execute(sched)

        runner.execute = faulty_execute

    def step(self):  # type: ignore[no-untyped-def]
        if any(STEP_FAULT_TOKEN in s.prompt_token_ids for s in self.output_processor.states.values()):
            raise RuntimeError("injected step failure")
        return super().step()
