"""A fake causal LM for scheduler tests: the greedy next token at position ``p`` depends on the request, ``p`` and
the token at ``p-1`` — so feeding a wrong token or a wrong position anywhere changes every later token, and a lost
or duplicated token cannot go unnoticed. Drafts agree with the target with a given probability."""

from __future__ import annotations

import random

from sparsespec_compile.runtime.scheduler import Refresh, Scheduler, StepKind, StepPlan

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


class FakeKV:
    """The device and host pools as the engine would hold them, one label per token slot: ``(request id, position,
    token)``; pillar rows labelled ``(request id, draft_start)``. ``apply`` runs a plan's swaps in the engine's order
    (swap-in, then swap-out), ``run`` checks every entry reads exactly the KV (and pillars) it wrote and then writes
    its own tokens — so a page lost, overwritten or restored to the wrong place by a swap cannot go unnoticed."""

    def __init__(self, page_size: int) -> None:
        self.page = page_size
        self.dev: dict[tuple[int, int], tuple] = {}
        self.host: dict[tuple[int, int], tuple] = {}
        self.dev_pillars: dict[int, tuple] = {}
        self.host_pillars: dict[int, tuple] = {}

    @staticmethod
    def _copy(src: dict, dst: dict, src_blocks, dst_blocks, page: int) -> None:
        for s, d in zip(src_blocks, dst_blocks, strict=True):
            for o in range(page):
                if (s, o) in src:
                    dst[(d, o)] = src[(s, o)]
                else:
                    dst.pop((d, o), None)

    def apply(self, plan: StepPlan) -> None:
        for op in plan.swap_in:
            self._copy(self.host, self.dev, op.host_blocks, op.device_blocks, self.page)
            self.dev_pillars[op.pillar_slot] = self.host_pillars.get(op.host_row)
        for op in plan.swap_out:
            self._copy(self.dev, self.host, op.device_blocks, op.host_blocks, self.page)
            self.host_pillars[op.host_row] = self.dev_pillars.get(op.pillar_slot)

    def run(self, plan: StepPlan) -> None:
        for e in plan.entries:
            r, page = e.request, self.page
            seq = r.all_token_ids + (r.draft_token_ids if e.kind is StepKind.DRAFT else [])
            for p in range(e.start_pos):
                got = self.dev.get((r.block_table[p // page], p % page))
                assert got == (r.request_id, p, seq[p]), (e, p, got)
            if e.sparse:
                assert self.dev_pillars.get(r.pillar_slot) == (r.request_id, e.draft_start), e
            for p, t in zip(e.positions, e.token_ids):
                self.dev[(r.block_table[p // page], p % page)] = (r.request_id, p, t)
            if e.refresh is not Refresh.NONE:
                self.dev_pillars[r.pillar_slot] = (r.request_id, e.start_pos)
