"""The public API: ``LLM(model_or_compiled).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch

from sparsespec_compile.compile_options import compile_options_of, resolve_config
from sparsespec_compile.config import SparseSpecConfig
from sparsespec_compile.passes.fuse_projections import refresh_fused_weights

from .engine import Engine
from .request import Request
from .sampling_params import SamplingParams
from .prompts import encode, split_prompts
from .servable import check_model

log = logging.getLogger("sparsespec.runtime")


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" | "length" | "error: ..."
    metrics: dict = field(default_factory=dict)


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


@dataclass
class _CompileTime:
    """Steps of ``generate`` during which Dynamo compiled a graph: their wall time and output tokens."""

    seconds: float = 0.0
    tokens: int = 0
    steps: int = 0


def _graphs_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


class LLM:
    """Speculative generation with a sparsespec-compiled Hugging Face causal LM.

    ``LLM(model)`` compiles it with ``backend="sparsespec"`` (Inductor unless ``config.compiler == "eager"``);
    ``LLM(torch.compile(model, backend="sparsespec"))`` uses yours. Prompts are strings (needs ``tokenizer``)
    or lists of token ids.
    """

    def __init__(self, model_or_compiled, config: SparseSpecConfig | None = None, tokenizer=None) -> None:
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

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]] | str,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_chat_template: bool = False,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order.

        A bad prompt (empty, too long, out-of-vocabulary ids) gets ``finish_reason="error: ..."`` and no tokens;
        the other prompts are generated as usual.
        """
        # fused q/k/v and gate/up copies see weights changed in place since the last call (CUDA-graph replays skip
        # the compiled graph's own per-call check)
        refresh_fused_weights(self.model)
        prompts = split_prompts(prompts)  # a malformed call raises; a malformed prompt fails its own request below
        params = params or SamplingParams()
        per = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(per) != len(prompts):
            raise ValueError(f"got {len(per)} SamplingParams for {len(prompts)} prompts")
        reqs: list[Request | None] = []
        outputs: dict[int, RequestOutput] = {}
        for i, (prompt, p) in enumerate(zip(prompts, per)):
            try:
                ids = encode(prompt, self.tokenizer, use_chat_template)
                req = Request(ids, p)
                bad = [t for t in ids if t >= self.engine.vocab_size]
                if bad:
                    raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {self.engine.vocab_size})")
            except ValueError as exc:
                outputs[i] = RequestOutput(-1, [], [], None, f"error: {exc}")
                reqs.append(None)
                continue
            reqs.append(req)
            self.engine.add_request(req)
        by_id = {r.request_id: i for i, r in enumerate(reqs) if r is not None}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            total = sum(r.params.max_tokens for r in reqs if r is not None)
            bar = tqdm(total=total, desc="generate", unit="tok", dynamic_ncols=True)
        done = 0
        while self.engine.has_unfinished():
            graphs, stats = _graphs_compiled(), self.engine.stats
            seconds, tokens = stats.seconds, stats.output_tokens
            for r in self.engine.step():
                if r.request_id in by_id:
                    outputs[by_id[r.request_id]] = self._output(r)
            if _graphs_compiled() != graphs:  # Dynamo compiled a graph in this step: compile time, not decoding
                self._compile.seconds += stats.seconds - seconds
                self._compile.tokens += stats.output_tokens - tokens
                self._compile.steps += 1
            if bar is not None:
                now = sum(len(r.output_token_ids) for r in reqs if r is not None)
                bar.update(now - done)
                done = now
        if bar is not None:
            bar.close()
        return [outputs[i] for i in range(len(prompts))]

    def _output(self, r: Request) -> RequestOutput:
        text = None
        if self.tokenizer is not None and r.output_token_ids:
            text = self.tokenizer.decode(r.output_token_ids, skip_special_tokens=True)
        m = r.metrics
        metrics = {
            "accepted": list(m.accepted),
            "drafted": list(m.drafted),  # the k chosen at each cycle (0: a plain decode)
            "mean_accepted": m.mean_accepted(self.config.stride),
            **m.speculation(self.config.stride, len(r.output_token_ids)),
            "preemptions": m.num_preemptions,
            "offloads": m.num_offloads,
        }
        return RequestOutput(r.request_id, r.prompt_token_ids, list(r.output_token_ids), text, r.finish_reason or "",
                             metrics)

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
            "graph_seconds": s.graph_seconds,
            "graph_kv_tokens_read": s.graph_kv_tokens_read,
        }
