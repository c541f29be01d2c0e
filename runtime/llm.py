"""The public API: ``LLM(model_or_compiled).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from sparsespec_compile.compile_options import compile_options_of, resolve_config
from sparsespec_compile.config import SparseSpecConfig
from sparsespec_compile.passes.fuse_projections import refresh_fused_weights

from .engine import Engine
from .request import Request
from .sampling_params import SamplingParams
from .stride_policy import FixedStride
from .prompts import chat_ids, encode, split_prompts
from .stop_strings import StopStrings
from .streaming import StreamEvent, TextDelta
from .servable import check_model
from .stats_log import StatsLog

log = logging.getLogger("sparsespec.runtime")


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" | "length" | "abort" | "error: ..."
    metrics: dict = field(default_factory=dict)
    stop_reason: str | int | None = None  # the stop string matched, or the stop id / EOS that ended it
    # SamplingParams.logprobs: per token, {token id: log-prob} of the token itself and its top alternatives
    logprobs: list[dict[int, float]] | None = None


def check_request(prompt, params: SamplingParams | None, tokenizer, vocab_size: int,
                  use_chat_template: bool = False) -> Request:
    """``LLM.make_request`` without the model: what a server process that holds only the tokenizer and the
    vocabulary size checks before handing the prompt to the process that runs the engine (which builds the same
    ``Request`` again from the ids)."""
    params = params or SamplingParams()
    ids = encode(prompt, tokenizer, use_chat_template)
    req = Request(ids, params)
    bad = [t for t in ids if t >= vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {vocab_size})")
    if params.stop:
        req.stop_check = StopStrings(tokenizer, params.stop)
    return req


def load_model_dir(path: str | os.PathLike):
    """(model, tokenizer or None) from a Hugging Face model directory: the checkpoint's dtype on CUDA (then the
    model goes to the GPU), float32 on a CPU; the tokenizer when the directory has one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"LLM({str(path)!r}): no such directory (a Hugging Face model directory with config.json; "
                         "nothing is downloaded)")
    if not (p / "config.json").is_file():
        raise ValueError(f"LLM({str(path)!r}): no config.json in that directory")
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(p, dtype="auto" if cuda else torch.float32)
    model = model.to("cuda" if cuda else "cpu").eval()
    has_tok = any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    return model, AutoTokenizer.from_pretrained(p) if has_tok else None


def _unwrap(model_or_compiled):
    """(compiled callable, original nn.Module) from a model or a ``torch.compile``-d model."""
    orig = getattr(model_or_compiled, "_orig_mod", None)
    if orig is not None:
        return model_or_compiled, orig
    if isinstance(model_or_compiled, torch.nn.Module):
        return None, model_or_compiled
    raise TypeError(
        f"LLM() takes a Hugging Face causal LM or torch.compile(model, backend='sparsespec'), "
        f"got {type(model_or_compiled).__name__}"
    )


def _check_conversation(messages) -> list:
    if not isinstance(messages, (list, tuple)) or not messages or not all(
            isinstance(m, Mapping) and "role" in m and "content" in m for m in messages):
        raise ValueError(f"a conversation is a list of {{'role': ..., 'content': ...}} messages, got {messages!r}")
    return list(messages)


@dataclass
class _CompileTime:
    """Steps of ``generate`` during which Dynamo compiled a graph: their wall time and output tokens."""

    seconds: float = 0.0
    tokens: int = 0
    steps: int = 0


def _gate_stats(gate) -> dict | None:
    if gate is None:
        return None
    return {"mode": gate.mode, "winner": gate.winner, "rounds": gate.rounds, "early_stops": gate.early_stops,
            "skipped": gate.skipped, "goodput": dict(gate.goodput)}


def _graphs_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


class LLM:
    """Speculative generation with a sparsespec-compiled Hugging Face causal LM.

    ``LLM(model)`` compiles it with ``backend="sparsespec"`` (Inductor unless ``config.compiler == "eager"``);
    ``LLM(torch.compile(model, backend="sparsespec"))`` uses yours; ``LLM("path/to/model")`` loads a Hugging Face
    model directory (and its tokenizer). Prompts are strings (needs ``tokenizer``) or lists of token ids. A model
    that cannot be served exactly is refused here (servable.py), not per request.
    """

    def __init__(self, model_or_compiled, config: SparseSpecConfig | None = None, tokenizer=None) -> None:
        if isinstance(model_or_compiled, (str, os.PathLike)):  # LLM("path/to/model"): model and tokenizer from there
            model_or_compiled, own = load_model_dir(model_or_compiled)
            tokenizer = tokenizer if tokenizer is not None else own
        compiled, model = _unwrap(model_or_compiled)
        # torch.compile(..., options={...})'s runtime options are honoured; conflicts are refused (compile_options.py)
        self.config = resolve_config(compile_options_of(compiled) if compiled is not None else None, config)
        if model.training:
            model.eval()
        check_model(model)  # refuse what cannot be served exactly now, not per request inside the step loop
        if compiled is None:
            import sparsespec_compile  # noqa: F401  (registers the backend)

            compiled = torch.compile(model, backend="sparsespec", options={"compiler": self.config.compiler,
                                                                          "fuse_projections": self.config.fuse_projections})
        self.model, self.compiled, self.tokenizer = model, compiled, tokenizer
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self.engine = Engine(compiled, model, self.config, eos_token_ids=eos_ids)
        self._compile = _CompileTime()
        interval = self.config.log_stats_interval
        sched = self.engine.scheduler
        self._stats_log = StatsLog(interval, self._stats, lambda: (len(sched.running), len(sched.waiting))) \
            if interval else None

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]] | str,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_chat_template: bool = False,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order.

        A bad prompt (empty, too long, out-of-vocabulary ids, not token ids) gets ``finish_reason="error: ..."`` and
        no tokens; the other prompts are generated as usual. A malformed call (not prompts at all) raises.
        """
        outputs: dict[int, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(desc="generate", unit="tok", dynamic_ncols=True)
        try:
            # no text per step: each output is decoded once, when it finishes. Re-decoding every running output at
            # every step cost 0.32 ms per 512-token output with SmolLM2's tokenizer on a CPU: 80 ms a step at 256
            # requests, far more than the step itself on a GPU.
            for event in self._events(prompts, params, use_chat_template, text=False):
                if bar is not None:
                    bar.update(len(event.token_ids))
                if event.output is not None:
                    outputs[event.index] = event.output
        finally:
            if bar is not None:
                bar.close()
        return [outputs[i] for i in range(len(outputs))]

    def generate_stream(
        self,
        prompts: Sequence[str | Sequence[int]] | str,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_chat_template: bool = False,
    ) -> Iterator[StreamEvent]:
        """``generate``, as an iterator of ``StreamEvent``s: after each step, one per prompt that gained final tokens
        (``event.token_ids``, ``event.text``), and a last one per prompt with its ``RequestOutput``
        (``event.output``). Leaving the loop early aborts the call's remaining requests.

            for ev in llm.generate_stream(["Tell me a story"], SamplingParams(max_tokens=256), use_chat_template=True):
                print(ev.text, end="", flush=True)
        """
        return self._events(prompts, params, use_chat_template, text=True)

    def _events(self, prompts, params, use_chat_template: bool, text: bool) -> Iterator[StreamEvent]:
        """``generate_stream``'s events; ``text=False``: running requests' events carry token ids only (``""``)."""
        # fused q/k/v and gate/up copies see weights changed in place since the last call (CUDA-graph replays skip
        # the compiled graph's own per-call check)
        refresh_fused_weights(self.model)
        prompts = split_prompts(prompts)  # a malformed call raises; a malformed prompt fails its own request below
        params = params or SamplingParams()
        per = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(per) != len(prompts):
            raise ValueError(f"got {len(per)} SamplingParams for {len(prompts)} prompts")
        live: dict[int, tuple[int, Request, TextDelta]] = {}  # request id -> (prompt index, request, stream state)
        failed: list[StreamEvent] = []
        for i, (prompt, p) in enumerate(zip(prompts, per)):
            try:
                req = self.make_request(prompt, p, use_chat_template)
            except ValueError as exc:
                failed.append(StreamEvent(i, [], "", RequestOutput(-1, [], [], None, f"error: {exc}")))
                continue
            live[req.request_id] = (i, req, TextDelta(self.tokenizer if text else None, req))
            self.engine.add_request(req)
        yield from failed
        try:
            while live:
                finished = self.step()
                for r in finished:
                    if r.request_id in live:
                        i, _, delta = live.pop(r.request_id)
                        out = self.output(r)
                        yield StreamEvent(i, *delta.last(out.text, out.token_ids), out)
                for i, _, delta in list(live.values()):
                    ids, text = delta.new()
                    if ids:
                        yield StreamEvent(i, ids, text)
        finally:
            if live:  # the caller stopped early: abort what is left of this call and let the engine drain it
                for _, r, _ in live.values():
                    self.abort(r)
                while self.engine.has_unfinished():
                    self.step()

    def chat(self, messages, params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate the assistant's reply to a conversation, or to each of a list of conversations.

        ``messages``: ``[{"role": "user", "content": "..."}, ...]`` (one conversation) or a list of those, through
        the tokenizer's chat template with the assistant turn opened (vLLM's ``LLM.chat``)."""
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
        if not conversations:
            raise ValueError("chat() got no messages")
        prompts = [chat_ids(self.tokenizer, _check_conversation(c)) for c in conversations]
        return self.generate(prompts, params, use_tqdm=use_tqdm)

    # ---- one request at a time: what a server's step loop drives (add / step / abort, as vLLM's LLMEngine) ----------
    def make_request(self, prompt, params: SamplingParams | None = None, use_chat_template: bool = False) -> Request:
        """A ``Request`` for one prompt, checked (``ValueError`` naming the problem) but not queued: hand it to
        ``self.engine.add_request``. Reads no engine state that steps change, so another thread may call it."""
        return check_request(prompt, params, self.tokenizer, self.engine.vocab_size, use_chat_template)

    def step(self) -> list[Request]:
        """One engine step; returns the requests finished (each once). A step during which Dynamo compiled a graph
        counts as compile time, not decoding (``stats``)."""
        graphs, stats = _graphs_compiled(), self.engine.stats
        seconds, tokens = stats.seconds, stats.output_tokens
        finished = self.engine.step()
        if _graphs_compiled() != graphs:
            self._compile.seconds += stats.seconds - seconds
            self._compile.tokens += stats.output_tokens - tokens
            self._compile.steps += 1
        if self._stats_log is not None:
            self._stats_log.maybe_log()
        return finished

    def abort(self, request: Request) -> None:
        """Finish ``request`` now (``finish_reason="abort"``), from any state, and free its KV pages; the next
        ``step`` reports it. Call it from the thread that calls ``step``."""
        self.engine.scheduler.abort(request, "abort")

    def output(self, r: Request) -> RequestOutput:
        """The ``RequestOutput`` of a finished request: its text cut at a matched stop string, its metrics."""
        text = stop_reason = None
        if self.tokenizer is not None and r.output_token_ids:
            text = self.tokenizer.decode(r.output_token_ids, skip_special_tokens=True)
        if r.stop_check is not None and r.stop_check.matched is not None:
            text, stop_reason = r.stop_check.cut(text or ""), r.stop_check.matched
        elif r.finish_reason == "stop" and r.output_token_ids:
            stop_reason = r.output_token_ids[-1]  # a stop id or EOS (kept in the ids, as HF generate does)
        m = r.metrics
        metrics = {
            "accepted": list(m.accepted),
            "drafted": list(m.drafted),  # the k chosen at each cycle (0: a plain decode)
            "recall": list(m.recall),  # draft recall at each scored verification (mean over layers)
            "mean_accepted": m.mean_accepted(self.config.stride),
            **m.speculation(self.config.stride, len(r.output_token_ids)),
            "preemptions": m.num_preemptions,
            "offloads": m.num_offloads,
        }
        logprobs = list(r.output_logprobs) if r.params.logprobs is not None else None
        return RequestOutput(r.request_id, r.prompt_token_ids, list(r.output_token_ids), text, r.finish_reason or "",
                             metrics, stop_reason, logprobs)

    @contextlib.contextmanager
    def warming_up(self, stride: int | None = None) -> Iterator[None]:
        """Requests run inside draft ``stride`` tokens every cycle (None: the full stride; 0: plain decoding),
        whatever the adaptive stride and its speculation gate would choose, so a warm-up compiles and captures the
        kernels and graphs of the steps it asks for: the gate measures plain decoding first and the prices keep
        short contexts plain, so a short warm-up would meet no speculative step and the first speculative round of
        the real run would pay them (7 s of captures and 0.5-1.7 s compile stalls on the H200). Afterwards the
        adaptive stride is back with a fresh gate, as a new engine's. A fixed-stride LLM warms up at its stride."""
        engine = self.engine
        planner, gate = engine.scheduler.planner, engine.gate
        policy = planner.policy
        if stride is not None and not 0 <= stride <= policy.stride:
            raise ValueError(f"warming_up(stride={stride}): choose 0 .. the LLM's stride {policy.stride}")
        if not policy.adaptive:
            yield
            return
        planner.policy = FixedStride(policy.stride if stride is None else stride)
        engine.use_gate(None)
        try:
            yield
        finally:
            planner.policy = policy
            engine.use_gate(gate.fresh() if gate is not None else None)

    def stats(self, reset: bool = False) -> dict:
        """Mean accepted length and per-position acceptance over full cycles, the k chosen per cycle and acceptance by
        position over every cycle, tokens per step, throughput, step counts, since the LLM was built or the last
        ``stats(reset=True)`` (which returns them, then starts counting afresh).

        ``seconds`` / ``tokens_per_s`` leave out the steps during which Dynamo compiled a graph (``compile_seconds``,
        ``compile_steps``; the first graph is compiled when the LLM is built) and CUDA-graph capture
        (``capture_seconds``)."""
        out = self._stats()
        if reset:
            self.engine.reset_stats()
            self._compile = _CompileTime()
        return out

    def _stats(self) -> dict:
        s, k, comp = self.engine.stats, self.config.stride, self._compile
        c = self.engine.scheduler.planner.stats
        seconds, tokens = s.seconds - comp.seconds, s.output_tokens - comp.tokens
        cycles = c.full_cycles
        mean = sum(a * n for a, n in enumerate(c.accepted_hist)) / cycles if cycles else 0.0
        # position i (1-based) accepted in a cycle iff that cycle accepted >= i drafts
        per_pos = [sum(c.accepted_hist[i:]) / cycles if cycles else 0.0 for i in range(1, k + 1)]
        all_cycles = sum(c.cycles_by_k)
        return {
            "stride": k,
            "adaptive": self.config.adaptive,
            "draft": self.config.draft,
            "cycles": cycles,  # full cycles (k == stride)
            "mean_accepted": mean,
            "per_position_acceptance": per_pos,
            # every cycle, whatever its k: how often each k was chosen, and acceptance by position where drafted
            "all_cycles": all_cycles,
            "cycles_by_k": list(c.cycles_by_k),
            "mean_k": sum(j * n for j, n in enumerate(c.cycles_by_k)) / all_cycles if all_cycles else 0.0,
            "position_drafted": list(c.drafted_at),
            "position_accepted": list(c.accepted_at),
            "per_position_acceptance_all": [a / d if d else 0.0 for a, d in zip(c.accepted_at, c.drafted_at)],
            "tokens_per_step": s.output_tokens / s.steps if s.steps else 0.0,
            "tokens_per_request_step": s.output_tokens / s.request_steps if s.request_steps else 0.0,
            "steps": s.steps,
            "output_tokens": s.output_tokens,
            "forward_tokens": s.forward_tokens,
            "request_steps": s.request_steps,
            # the adaptive stride's step costs (c0 s, s/token, s/full key, s/sparse key; step_cost.py), None if fixed
            "step_cost": list(self.engine.step_cost.coefficients()) if self.config.adaptive and k else None,
            # the batch-level switch (speculation_gate.py): its mode now, the last round's winner and goodputs
            "speculation_gate": _gate_stats(self.engine.gate),
            "mean_requests_per_step": s.request_steps / s.steps if s.steps else 0.0,
            "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            "compile_seconds": comp.seconds,
            "compile_steps": comp.steps,
            "graph_steps": s.graph_steps,
            "cuda_graphs": self.engine.graphs.num_graphs if self.engine.graphs is not None else 0,
            "gpu_busy_seconds": s.gpu_busy_seconds,
            # share of the step loop's wall time the GPU had no work (0.0 when not measured: CPU)
            "idle_fraction": 1.0 - s.gpu_busy_seconds / s.seconds if s.seconds and s.gpu_busy_seconds else 0.0,
            "kv_tokens_read": s.kv_tokens_read,
            "capture_seconds": s.capture_seconds,
            # the step loop's host time by stage (wait: blocked on the device's results, inside resolve)
            "schedule_seconds": s.schedule_seconds,
            "launch_seconds": s.launch_seconds,
            "resolve_seconds": s.resolve_seconds,
            "wait_seconds": s.wait_seconds,
            "graph_seconds": s.graph_seconds,
            "graph_kv_tokens_read": s.graph_kv_tokens_read,
            # draft recall: share of the verify queries' attention inside the next draft's keys, per layer (mean
            # over the scored verifications; streaming and full drafts score nothing: empty)
            "recall_verifies": s.recall_verifies,
            "recall_sum_by_layer": list(s.recall_sum),
            "recall_by_layer": [x / s.recall_verifies for x in s.recall_sum] if s.recall_verifies else [],
            "mean_recall": sum(s.recall_sum) / len(s.recall_sum) / s.recall_verifies if s.recall_verifies else None,
        }
