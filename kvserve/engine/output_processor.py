"""OutputProcessor: engine requests -> user-facing RequestOutputs.

Groups the samples of an n > 1 request, detokenizes incrementally, applies
stop strings, and turns raw logprob dicts into `Logprob` objects with decoded
tokens.  A stop-string match finishes the sample here; the ids of engine
requests to finish because of it come back in `ProcessedOutputs.stopped`
(plain data: the caller passes them to the engine core), never through a
callback into the scheduler.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from kvserve.engine.detokenizer import IncrementalDetokenizer
from kvserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from kvserve.request import Request, RequestStatus
from kvserve.sampling_params import SamplingParams


@dataclass
class SampleState:
    detok: Optional[IncrementalDetokenizer]
    token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[list[dict[int, Logprob]]] = None
    cumulative_logprob: Optional[float] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[str | int] = None


@dataclass
class RequestState:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    samples: dict[int, SampleState] = field(default_factory=dict)
    prompt_logprobs: Optional[list] = None
    error: Optional[str] = None
    kv_transfer_params: Optional[dict] = None  # set when the engine exported the request's KV

    @property
    def finished(self) -> bool:
        return len(self.samples) == self.params.n and all(s.finish_reason for s in self.samples.values())


@dataclass
class ProcessedOutputs:
    outputs: list[RequestOutput] = field(default_factory=list)
    # Engine request ids (samples) a stop string finished, still unfinished in the engine.
    stopped: list[str] = field(default_factory=list)


def to_logprobs(raw: dict[int, float], decode: Callable[[int], str]) -> dict[int, Logprob]:
    ranked = sorted(raw.items(), key=lambda kv: -kv[1])
    return {tid: Logprob(lp, rank + 1, decode(tid)) for rank, (tid, lp) in enumerate(ranked)}


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}

    def add(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
            params: SamplingParams, arrival_time: float) -> None:
        self.states[request_id] = RequestState(request_id, prompt, prompt_token_ids, params,
                                               RequestMetrics(arrival_time=arrival_time))

    def _decode_one(self, tid: int) -> str:
        return self.tokenizer.decode([tid]) if self.tokenizer is not None else ""

    def _sample(self, state: RequestState, index: int) -> SampleState:
        s = state.samples.get(index)
        if s is None:
            p = state.params
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, state.prompt_token_ids, p.skip_special_tokens,
                                               p.stop, p.include_stop_str_in_output)
            s = SampleState(detok, logprobs=[] if p.logprobs is not None else None,
                            cumulative_logprob=0.0 if p.logprobs is not None else None)
            state.samples[index] = s
        return s

    def process(self, requests: list[Request]) -> ProcessedOutputs:
        """Fold engine updates into request states: outputs for touched user requests,
        and the engine requests that stop strings finished."""
        result = ProcessedOutputs()
        touched: dict[str, RequestState] = {}
        for req in requests:
            group = req.parent_id or req.request_id
            state = self.states.get(group)
            if state is None:
                continue
            touched[group] = state
            sample = self._sample(state, req.sample_index)
            new_ids = req.output_token_ids[len(sample.token_ids):]
            if state.metrics.first_token_time is None and req.first_token_time is not None:
                state.metrics.first_token_time = req.first_token_time
            state.metrics.num_cached_tokens = max(state.metrics.num_cached_tokens, max(0, req.num_cached_tokens))
            state.metrics.num_preemptions = max(state.metrics.num_preemptions, req.num_preemptions)
            if req.prompt_logprobs and state.params.prompt_logprobs is not None and state.prompt_logprobs is None \
                    and len(req.prompt_logprobs) == len(req.prompt_token_ids):
                plp: list[Optional[dict[int, Logprob]]] = [None]
                plp += [to_logprobs(d, self._decode_one) if d is not None else None for d in req.prompt_logprobs[1:]]
                state.prompt_logprobs = plp
            if self._append_tokens(state, sample, req, new_ids):
                result.stopped.append(req.request_id)
            if req.status == RequestStatus.FINISHED_ERROR:
                state.error = str(req.stop_reason)
            if req.kv_transfer_out is not None:
                state.kv_transfer_params = req.kv_transfer_out
            if req.is_finished and sample.finish_reason is None:
                sample.finish_reason = req.status.finish_reason
                sample.stop_reason = req.stop_reason
                if sample.detok is not None and sample.detok.stopped_on is None:
                    sample.detok.flush()
                    if sample.detok.stopped_on is not None:
                        sample.finish_reason, sample.stop_reason = "stop", sample.detok.stopped_on
        for group, state in touched.items():
            out = self.make_output(state)
            result.outputs.append(out)
            if out.finished:
                del self.states[group]
        return result

    def _append_tokens(self, state: RequestState, sample: SampleState, req: Request, new_ids: list[int]) -> bool:
        """Add new tokens to a sample; True when a stop string finished it while the
        engine request is still running (the engine must finish it)."""
        if not new_ids:
            return False
        first = len(sample.token_ids)
        sample.token_ids.extend(new_ids)
        if sample.logprobs is not None:
            for raw in req.output_logprobs[first:first + len(new_ids)]:
                sample.logprobs.append(to_logprobs(raw, self._decode_one))
            cumulative = sample.cumulative_logprob or 0.0  # set whenever logprobs are
            for tid, raw in zip(new_ids, req.output_logprobs[first:first + len(new_ids)]):
                cumulative += raw.get(tid, 0.0)
            sample.cumulative_logprob = cumulative
        if sample.detok is None or sample.detok.stopped_on is not None:
            return False
        for i, tid in enumerate(new_ids):
            sample.detok.add_tokens([tid])
            if sample.detok.stopped_on is not None:
                # Stop string: keep tokens up to the one that completed it, finish the request.
                keep = first + i + 1
                del sample.token_ids[keep:]
                if sample.logprobs is not None:
                    del sample.logprobs[keep:]
                sample.finish_reason = "stop"
                sample.stop_reason = sample.detok.stopped_on
                return not req.is_finished
        return False

    def make_output(self, state: RequestState) -> RequestOutput:
        finished = state.finished
        outputs = []
        for idx in sorted(state.samples):
            s = state.samples[idx]
            text = s.detok.visible_text(s.finish_reason is not None) if s.detok is not None else ""
            outputs.append(CompletionOutput(
                index=idx, text=text, token_ids=list(s.token_ids), cumulative_logprob=s.cumulative_logprob,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                finish_reason=s.finish_reason, stop_reason=s.stop_reason,
            ))
        if finished:
            import time

            state.metrics.finish_time = time.time()
        return RequestOutput(
            request_id=state.request_id, prompt=state.prompt, prompt_token_ids=state.prompt_token_ids,
            outputs=outputs, finished=finished, metrics=state.metrics, prompt_logprobs=state.prompt_logprobs,
            num_cached_tokens=state.metrics.num_cached_tokens, error=state.error,
            kv_transfer_params=state.kv_transfer_params,
        )

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        state = self.states.pop(request_id, None)
        if state is None:
            return None
        for i in range(state.params.n):
            s = self._sample(state, i)
            if s.finish_reason is None:
                s.finish_reason = "abort"
        return self.make_output(state)
