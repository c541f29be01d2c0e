"""``check_lossless``: greedy speculative generation through ``LLM`` equals the original model's greedy ``generate``.

Speculative decoding is lossless by construction: whatever a draft proposes, verification keeps only what the
target itself would have produced. So a difference in the emitted tokens is a real bug in the runtime (verify,
KV bookkeeping, scheduling), and a sparse budget well below the context makes drafts wrong often enough that the
verify path is exercised. A bug that only makes the *drafts* wrong (a draft step fed the wrong token) cannot show
in the tokens; ``dense_drafts=True`` catches those: with a budget covering the whole context the sparse draft is
full attention, so every draft must be accepted.

    check_lossless(model, [[5, 6, 7], [8, 9]], stride=4, budget=8)        # token-id prompts
    check_lossless(model, {"input_ids": ids, "attention_mask": mask})    # what inputs_for(config) draws
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

DEFAULT_MAX_NEW = 16


@dataclass
class LosslessCheck:
    """What ``check_lossless`` established (it raises before returning if a token differed)."""

    num_requests: int
    num_tokens: int  # generated tokens compared, over every request
    stride: int
    budget: int
    draft: str
    mean_accepted: float  # drafts accepted per full cycle (of ``stride``)
    acceptance: float  # mean_accepted / stride: 1.0 when every draft was accepted
    cycles: int
    graphs_compiled: int  # Dynamo graphs compiled while generating (one per recompile)
    token_counts: list[int] = field(default_factory=list)  # distinct flattened token counts T the graph ran with
    per_position: list[float] = field(default_factory=list)  # acceptance of draft slot 1..stride
    dense_acceptance: float | None = None  # acceptance with a budget covering the context (dense_drafts=True)
    refs: list[list[int]] = field(default_factory=list, repr=False)  # HF greedy tokens per request

    def __str__(self) -> str:
        return (
            f"check_lossless[stride {self.stride}, budget {self.budget}, {self.draft}]: {self.num_requests} "
            f"request(s), {self.num_tokens} tokens equal to HF greedy; acceptance {self.acceptance:.2f} over "
            f"{self.cycles} cycles; {self.graphs_compiled} graph(s) for {len(self.token_counts)} token counts"
        )


def prompts_from_inputs(inputs: Any) -> list[list[int]]:
    """Token-id prompts from what a user has: a list of prompts, one prompt, an ``input_ids`` tensor ``[B, S]``,
    or a dict of them (``inputs_for``'s draws) whose ``attention_mask`` marks padding (left or right) to strip."""
    if isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise ValueError(f"inputs dict needs 'input_ids', got keys {sorted(inputs)}")
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    else:
        ids, mask = inputs, None
    if isinstance(ids, torch.Tensor):
        ids = ids.view(1, -1) if ids.dim() == 1 else ids
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, S] or [S], got shape {tuple(ids.shape)}")
        keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
        if keep.shape != ids.shape:
            raise ValueError(f"attention_mask shape {tuple(keep.shape)} != input_ids shape {tuple(ids.shape)}")
        prompts = [row[m].tolist() for row, m in zip(ids.cpu(), keep.cpu())]
    elif isinstance(ids, Sequence) and ids and all(isinstance(t, int) for t in ids):
        prompts = [list(ids)]
    elif isinstance(ids, Sequence):
        prompts = [list(p) for p in ids]
    else:
        raise TypeError(f"inputs must be prompts (lists of token ids), a tensor or a dict, got {type(ids).__name__}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError(f"every prompt needs at least one token, got lengths {[len(p) for p in prompts]}")
    return prompts


def default_prompts(config, seed: int = 0) -> list[list[int]]:
    """Three prompts of 5, 13 and 27 tokens (longer than small budgets, across page boundaries)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in (5, 13, 27)]


def hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """The reference: ``model.generate`` greedy, exactly ``n`` new tokens (EOS neither stops nor is suppressed:
    ``min_new_tokens`` would suppress it, which the runtime's ``ignore_eos`` does not), the prompt unpadded."""
    pad = getattr(model.config, "pad_token_id", None)
    device = next(model.parameters()).device
    with torch.no_grad():  # keyword overrides: a GenerationConfig argument would inherit the model's EOS again
        # return_dict_in_generate: a config with output_attentions / output_hidden_states=True makes generate return
        # a ModelOutput even when not asked; read .sequences either way
        out = model.generate(torch.tensor([prompt], device=device), max_new_tokens=n, do_sample=False, num_beams=1,
                             repetition_penalty=1.0, eos_token_id=None, pad_token_id=0 if pad is None else pad,
                             return_dict_in_generate=True)
    out = out.sequences[0, len(prompt):].tolist()
    assert len(out) == n, f"HF generate stopped after {len(out)} of {n} tokens"
    return out


def make_llm(model: torch.nn.Module, prompts: list[list[int]], max_new: int, *, stride: int, budget: int,
             draft: str = "pillar", compiler: str = "eager", page_size: int = 4, fresh: bool = True, **config: Any):
    """An ``LLM`` sized for these prompts whose compiled forward records the token counts it runs with
    (``llm.token_counts``); ``fresh``: on a reset Dynamo state (else the graphs of the previous LLM of this model
    are reused: its compile options are the same). ``recent`` defaults to 1: a small budget stays mostly pillars."""
    from sparsespec_compile import LLM, SparseSpecConfig

    pages = sum(-(-(len(p) + max_new + stride + 1) // page_size) for p in prompts) + 8
    base = dict(adaptive=False, stride=stride, min_budget=budget, recent=min(1, budget), draft=draft, compiler=compiler,
                page_size=page_size, num_pages=pages, max_num_batched_tokens=max(32, stride + 1),
                max_num_seqs=min(64, len(prompts)))  # pillar slots: the store is [layers, seqs, heads, budget]
    if fresh:
        torch._dynamo.reset()  # a fresh compile: graphs counted below are this model's only
    llm = LLM(model, SparseSpecConfig(**{**base, **config}))
    counts: set[int] = set()
    compiled = llm.engine.compiled

    def recording(*args, **kwargs):
        counts.add(int(kwargs["input_ids"].shape[-1]))
        return compiled(*args, **kwargs)

    llm.engine.compiled = recording
    llm.token_counts = counts
    return llm


def check_lossless(
    model: torch.nn.Module,
    inputs: Any = None,
    *,
    stride: int = 4,
    budget: int = 8,
    max_new_tokens: int = DEFAULT_MAX_NEW,
    draft: str = "pillar",
    compiler: str = "eager",
    dense_drafts: bool = False,
    min_dense_acceptance: float = 0.9,
    **config: Any,
) -> LosslessCheck:
    """Generate greedily with ``LLM(model, SparseSpecConfig(stride, min_budget=budget, ...))`` and assert every
    request's tokens equal ``model.generate``'s (greedy, EOS ignored, ``max_new_tokens`` each).

    inputs: prompts as token-id lists, one prompt, an ``input_ids`` tensor or a dict with ``attention_mask``
        (padding stripped: see ``prompts_from_inputs``); ``None`` = three default prompts.
    budget: pillars per sparse draft (``min_budget``). Keep it below the prompt lengths so drafts are sparse.
    dense_drafts: also generate with a budget covering the whole context and assert the drafts (then full
        attention) were accepted at a rate >= ``min_dense_acceptance`` (below 1.0 only for argmax near-ties).
    config: further ``SparseSpecConfig`` fields (``page_size``, ``num_pages``, ``attention_impl``, ...).
    Raises AssertionError naming the request, its first divergent position and both tokens.
    """
    if getattr(model, "config", None) is None:
        raise ValueError("check_lossless needs a Hugging Face causal LM (a model with .config)")
    prompts = default_prompts(model.config) if inputs is None else prompts_from_inputs(inputs)
    limit = int(getattr(model.config.get_text_config(), "max_position_embeddings", 0) or 0)
    if limit and max(len(p) for p in prompts) + max_new_tokens > limit:
        raise ValueError(f"prompt + max_new_tokens exceeds max_position_embeddings ({limit}): shorten them")
    was_training = model.training
    model.eval()
    try:
        result = _run(model, prompts, stride, budget, max_new_tokens, draft, compiler, config)
        if dense_drafts and stride > 0:
            # A budget covering the longest context: the sparse draft attends to every token. (Not "infinite": the
            # pillar store is sized by the budget, 30 layers x 64 slots x 1e6 pillars would be 46 GB.)
            dense_budget = max(map(len, prompts)) + max_new_tokens + stride + 1
            dense = _run(model, prompts, stride, dense_budget, max_new_tokens, draft, compiler,
                         {**config, "max_budget": dense_budget, "sparsity": 1.0, "fresh": False}, refs=result.refs)
            if dense.cycles and dense.acceptance < min_dense_acceptance:
                raise AssertionError(
                    f"with a budget covering the whole context (dense drafts == the target), only "
                    f"{dense.acceptance:.2f} of the drafts were accepted over {dense.cycles} full cycles "
                    f"(expected >= {min_dense_acceptance}): drafts are fed the wrong tokens or positions. "
                    f"Per position: {dense.per_position}; prompt lengths {[len(p) for p in prompts]}"
                )
            result.dense_acceptance = dense.acceptance
    finally:  # the compiled graphs stay cached (check_sampling's engine stage reuses them)
        model.train(was_training)
    return result


def _run(model, prompts, stride, budget, max_new, draft, compiler, config, refs=None) -> LosslessCheck:
    from sparsespec_compile import SamplingParams

    refs = refs or [hf_greedy(model, p, max_new) for p in prompts]
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    llm = make_llm(model, prompts, max_new, stride=stride, budget=budget, draft=draft, compiler=compiler, **config)
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_new, ignore_eos=True), use_tqdm=False)
    setting = f"stride={stride}, budget={budget}, draft={draft}"
    for i, (out, ref, prompt) in enumerate(zip(outs, refs, prompts)):
        got = list(out.token_ids)
        if out.finish_reason.startswith("error"):
            raise AssertionError(f"request {i} ({setting}): the runtime failed it: {out.finish_reason}; "
                                 f"prompt {_short(prompt)}")
        if got != ref:
            pos = next((j for j, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
            mine = got[pos] if pos < len(got) else "<none>"
            raise AssertionError(
                f"request {i} ({setting}): speculative output diverges from HF greedy generate at output "
                f"position {pos} (absolute position {len(prompt) + pos}): speculative token {mine} vs HF "
                f"token {ref[pos] if pos < len(ref) else '<none>'}; agreed prefix {_short(ref[:pos])}; "
                f"speculative {_short(got)}; HF {_short(ref)}; prompt ({len(prompt)} tokens) {_short(prompt)}; "
                f"accepted per cycle {out.metrics.get('accepted')}"
            )
    s = llm.stats()
    if stride and max_new >= 3 * (stride + 1) and not s["cycles"]:
        drafted = [o.metrics.get("drafted") for o in outs]
        raise AssertionError(f"no verify step judged {stride} drafts in {max_new} tokens per request ({setting}): "
                             f"the scheduler drops drafts; drafts per cycle, per request: {drafted}")
    check = LosslessCheck(
        num_requests=len(prompts), num_tokens=sum(map(len, refs)), stride=stride, budget=budget, draft=draft,
        mean_accepted=s["mean_accepted"], acceptance=s["mean_accepted"] / stride if stride else 1.0,
        cycles=s["cycles"], graphs_compiled=torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames_before,
        token_counts=sorted(llm.token_counts), per_position=[round(x, 2) for x in s["per_position_acceptance"]],
        refs=refs,
    )
    _note(check)
    return check


def _short(ids: list[int], n: int = 24) -> str:
    return str(ids) if len(ids) <= n else f"{ids[:n // 2]}...{ids[-n // 2:]} ({len(ids)} ids)"


def _note(check: LosslessCheck) -> None:
    """Inside a Hypothesis test, attach the run's summary to the falsifying example's report."""
    try:
        from hypothesis import note
        from hypothesis.control import currently_in_test_context

        if currently_in_test_context():
            note(str(check))
    except ImportError:  # Hypothesis is optional for check_lossless itself
        pass


__all__ = ["LosslessCheck", "check_lossless", "default_prompts", "hf_greedy", "make_llm", "prompts_from_inputs"]
