"""A fake causal LM for scheduler tests: the greedy next token at position ``p`` depends on the request, ``p`` and
the token at ``p-1`` — so feeding a wrong token or a wrong position anywhere changes every later token, and a lost
or duplicated token cannot go unnoticed. Drafts agree with the target with a given probability."""

from __future__ import annotations

import random

from sparsespec_compile.runtime.scheduler import Scheduler, StepKind, StepPlan

V = 64
EOS = 0


def oracle(rid: int, pos: int, prev: int) -> int:
    """Greedy target token at position ``pos`` given the token at ``pos - 1``."""
    x = (rid * 1_000_003 + pos * 7_919 + prev * 104_729) % 2_147_483_647
    x = (x * 48_271) % 2_147_483_647
    return 1 + x % (V - 1)  # never EOS; EOS is injected through eos_at below


def reference(req, eos_ids, max_model_len, eos_at: dict) -> tuple[list[int], str]:
    """What plain greedy decoding would output for ``req`` (tokens, finish reason)."""
    toks = list(req.prompt_token_ids)
    out: list[int] = []
    p = req.params
    while True:
        t = next_token(req.request_id, len(toks), toks[-1], eos_at)
        out.append(t)
        toks.append(t)
        if t in p.stop_token_ids or (t in eos_ids and not p.ignore_eos):
            return out, "stop"
        if len(out) >= p.max_tokens or len(toks) >= max_model_len:
            return out, "length"


def next_token(rid: int, pos: int, prev: int, eos_at: dict) -> int:
    return EOS if eos_at.get(rid) == pos else oracle(rid, pos, prev)


def simulate(plan: StepPlan, rng: random.Random, accept_prob: float, eos_at: dict,
             truth: dict[int, list[int]] | None = None) -> list[list[int]]:
    """Results for ``Scheduler.update``, as a real engine with greedy verification would produce them.

    ``truth[rid]`` (prompt + reference output) lets it assert every fed *verified* token is the right one.
    """
    results = []
    for e in plan.entries:
        rid, toks, s = e.request.request_id, e.token_ids, e.start_pos
        if truth is not None and e.kind is not StepKind.DRAFT:
            ref = truth[rid]
            assert list(toks[:1 if e.kind is StepKind.VERIFY else len(toks)]) == ref[s:s + (1 if e.kind is StepKind.VERIFY else len(toks))], (e, ref)
        if e.kind is StepKind.PREFILL:
            results.append([next_token(rid, e.seq_len, toks[-1], eos_at)] if e.num_logits else [])
        elif e.kind is StepKind.DRAFT:
            t = next_token(rid, e.seq_len, toks[0], eos_at)
            results.append([t if rng.random() < accept_prob else (t % (V - 1)) + 1])
        else:
            out = []
            for i in range(len(toks)):
                t = next_token(rid, s + i + 1, toks[i], eos_at)
                out.append(t)
                if i + 1 >= len(toks) or toks[i + 1] != t:
                    break
            results.append(out)
    return results


def run_to_completion(sched: Scheduler, rng: random.Random, accept_prob: float, eos_at: dict,
                      truth=None, max_steps: int = 100_000, on_plan=None) -> list:
    finished = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return finished
        plan = sched.schedule()
        finished += plan.finished
        if on_plan is not None:
            on_plan(plan)
        sched.update(plan, simulate(plan, rng, accept_prob, eos_at, truth))
    raise AssertionError(f"not finished after {max_steps} steps: {sched.running} {list(sched.waiting)}")
