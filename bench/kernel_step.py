"""The ``step`` section of bench/kernels.py: attention + pillar scoring + selection of a steady-state speculative
step, against the bytes floor of its rows, and against main's kernels of the same run when they are given.

A steady-state k-step: 1/(k+2) of the B rows verify k+1 tokens over context L and are scored; the rest draft one
token with PillarAttn (budget max(128, ceil(0.05 L)) pillars + a dense tail of 5). One step = the plan, then per
layer the attention launch(es) and the scoring launch, then one selection over every layer (what the runtime's
ops.select_step_pillars does). Each layer gets its own random block tables over one large pool, so no layer reads
what an earlier one left in L2.

floor = bytes that must move: each row's K/V once (drafts: their pillars + tail; verify rows: the context), the
verify rows' K once more for scoring, and the fp32 scores written once and read once.

Variants: ``fused`` = one plan and one launch for every row, the library's default (the decode block, BLOCK_M 16,
for every row: a verify chunk is several units that each read its K/V); ``fused_m32`` / ``fused_m64`` = the same with
32- / 64-row blocks for every row (a 9-token chunk of a 3- / 4-head group is one unit); ``by_kind`` = a plan and a
launch for the drafts and another for the verify rows (both in the library's block); ``split_one_pass`` = the same
with the verify launch in the block that holds the whole chunk (one pass over its keys), ``split_m32`` with 32-row
verify blocks; ``streams_one_pass`` = split_one_pass with the verify launch and its scoring on a second stream, beside
the drafts' launch (forked and joined per layer: parallel branches of the step's graph); ``main`` = the kernels of main before a change, loaded from OLD_KERNELS_DIR when set. The breakdown
times the verify rows alone in each block and the one-pass block's tile configs.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys

import torch
import triton


def load_old_kernels(kernels_pkg):
    """main's kernel modules from $OLD_KERNELS_DIR (made with ``git show main:sparsespec_compile/kernels/X.py``), at
    least attention_triton.py and pillars_triton.py; None when unset. Each file X.py there is imported as ``old_X``;
    a relative import of a module that is in the folder takes main's copy, any other (``_validate``, ``tuning``,
    ``attention_plan*`` when not given) the current package's."""
    d = os.environ.get("OLD_KERNELS_DIR")
    if not d:
        return None
    given = {f[:-3] for f in os.listdir(d) if f.endswith(".py") and not f.startswith("old_")}
    for name in given:
        src = open(os.path.join(d, f"{name}.py")).read()
        src = re.sub(r"^from \.(\w+) import",
                     lambda m: f"from {'old_' if m.group(1) in given else kernels_pkg.__name__ + '.'}{m.group(1)} import",
                     src, flags=re.M)
        with open(os.path.join(d, f"old_{name}.py"), "w") as f:
            f.write(src)
    if d not in sys.path:
        sys.path.insert(0, d)
    return {name: importlib.import_module(f"old_{name}") for name in ("attention_triton", "pillars_triton")}


# two-launch variants of the step: the verify rows' block (StepCase.verify_block_q)
BY_KIND = {"by_kind": "default", "split_one_pass": "one_pass", "split_m32": "32", "streams_one_pass": "one_pass"}
ON_TWO_STREAMS = {"streams_one_pass"}  # the two launches of a layer on two streams (parallel branches in the graph)
STEP_VARIANTS = ("fused", "fused_m32", "fused_m64") + tuple(BY_KIND)


class StepCase:
    """The metadata of one steady-state speculative step over ``pool`` (bench/kernels.py's Pool)."""

    def __init__(self, pool, B, L, n_layers, k=8, tail=5, seed=0):
        dev, dt = pool.k.device, pool.k.dtype
        self.pool, self.B, self.L, self.n_layers, self.k = pool, B, L, n_layers, k
        self.nv = max(1, round(B / (k + 2)))
        self.nd = B - self.nv
        g = torch.Generator(device=dev).manual_seed(seed)
        P = pool.k.shape[1]
        npg = math.ceil(L / P)
        # per layer: random pages drawn with replacement from the whole pool (contexts past the pool still fit)
        self.tables = [torch.randint(0, pool.pages, (B, npg), device=dev, generator=g, dtype=torch.int32)
                       for _ in range(n_layers)]
        q_lens = [1] * self.nd + [k + 1] * self.nv
        self.T = sum(q_lens)
        self.q = torch.randn(self.T, pool.hq, pool.d, device=dev, dtype=dt, generator=g)
        self.qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), device=dev, dtype=torch.int32)
        self.seq = torch.full((B,), L, device=dev, dtype=torch.int32)
        self.bud = max(128, math.ceil(0.05 * L))
        ds = L - tail
        self.draft_start = torch.cat([torch.full((self.nd,), ds, dtype=torch.int32, device=dev),
                                      torch.zeros(self.nv, dtype=torch.int32, device=dev)])
        self.is_sparse = torch.arange(B, device=dev) < self.nd
        pil = torch.rand(B, pool.hkv, ds, device=dev, generator=g).argsort(-1)[..., :self.bud].sort(-1).values
        self.pillars = pil.to(torch.int32).contiguous()
        self.pillar_len = torch.where(self.is_sparse, self.bud, 0).to(torch.int32)
        self.score_rows = torch.arange(self.nd, B, device=dev)
        self.ctx = torch.full((self.nv,), L - (k + 1), device=dev, dtype=torch.int32)
        self.budget = torch.full((self.nv,), max(128, math.ceil(0.05 * (L - k - 1))), device=dev, dtype=torch.int32)
        self.layer_scores = torch.empty(n_layers, self.nv, pool.hkv, L, device=dev, dtype=torch.float32)
        self.max_budget = int(self.budget.max())  # a host int: no sync inside the timed (captured) step
        # the two kinds apart (by_kind): drafts are rows [0, nd), verify rows [nd, B)
        self.qsl_d = self.qsl[: self.nd + 1]
        self.qsl_v = self.qsl[self.nd:] - self.nd
        self.q_d, self.q_v = self.q[: self.nd], self.q[self.nd:]
        self.group = pool.hq // pool.hkv

    def side_stream(self):
        if not hasattr(self, "_side"):
            self._side = torch.cuda.Stream()
        return self._side

    def verify_block_q(self, rows: str) -> int | None:
        """BLOCK_Q of a verify-only launch: None (the library's), "one_pass" (the whole k + 1 chunk in one block:
        BLOCK_M = the next power of two of (k + 1) x group), or a BLOCK_M such as "32"."""
        if rows == "default":
            return None
        if rows == "one_pass":
            return (1 << ((self.k + 1) * self.group - 1).bit_length()) // self.group
        return max(1, int(rows) // self.group)

    def floor_bytes(self) -> tuple[float, float]:
        """(step floor, of which attention K/V) in bytes."""
        p = self.pool
        kv_rows = self.nd * (self.bud + 5) + self.nv * self.L
        attn = p.kv_bytes(kv_rows)
        score_k = self.nv * (self.L - self.k - 1) * p.hkv * p.d * p.k.element_size()
        scores_rw = 2 * self.nv * p.hkv * (self.L - self.k - 1) * 4
        return self.n_layers * (attn + score_k + scores_rw), self.n_layers * attn


def run_step(case: StepCase, K, variant: str, old=None):
    """One step of ``variant``; returns the selected indices (for the cross-check)."""
    p = case.pool
    kw = dict(scale=p.scale)
    sp = dict(is_sparse=case.is_sparse, draft_start=case.draft_start, pillar_indices=case.pillars,
              pillar_lengths=case.pillar_len)
    if variant.startswith("fused"):  # fused_mN: every row in N-row blocks (fused_m64: 16 queries of a 4-head group, so a
        # verify chunk is one unit); fused: the library's choice (BLOCK_M 16 for steps of <= 16 queries per row)
        bq = max(1, int(variant[len("fused_m"):]) // case.group) if variant != "fused" else None
        plan = K.attention_plan(case.q, p.k, query_start_loc=case.qsl, seq_lens=case.seq, max_query_len=case.k + 1,
                                max_pillars=case.pillars.shape[2], block_q=bq,
                                **{k: v for k, v in sp.items() if k != "pillar_indices"})
    elif variant in BY_KIND:  # two launches: drafts in the decode block, verify rows in BY_KIND[variant]'s block
        plan_d = K.attention_plan(case.q_d, p.k, query_start_loc=case.qsl_d, seq_lens=case.seq[: case.nd],
                                  max_query_len=1, is_sparse=case.is_sparse[: case.nd],
                                  draft_start=case.draft_start[: case.nd], pillar_lengths=case.pillar_len[: case.nd],
                                  max_pillars=case.pillars.shape[2])
        plan_v = K.attention_plan(case.q_v, p.k, query_start_loc=case.qsl_v, seq_lens=case.seq[case.nd:],
                                  max_query_len=case.k + 1, block_q=case.verify_block_q(BY_KIND[variant]))
    for layer in range(case.n_layers):
        bt = case.tables[layer]
        if variant.startswith("fused"):
            _, lse = K.unified_attention(case.q, p.k, p.v, query_start_loc=case.qsl, seq_lens=case.seq, block_tables=bt,
                                         max_query_len=case.k + 1, max_seq_len=case.L, return_lse=True, plan=plan,
                                         **sp, **kw)
        elif variant in BY_KIND:
            def drafts():
                K.unified_attention(case.q_d, p.k, p.v, query_start_loc=case.qsl_d, seq_lens=case.seq[: case.nd],
                                    block_tables=bt[: case.nd], max_query_len=1, max_seq_len=case.L, plan=plan_d,
                                    is_sparse=case.is_sparse[: case.nd], draft_start=case.draft_start[: case.nd],
                                    pillar_indices=case.pillars[: case.nd], pillar_lengths=case.pillar_len[: case.nd],
                                    **kw)

            def verify_and_score():
                _, lse_v = K.unified_attention(case.q_v, p.k, p.v, query_start_loc=case.qsl_v,
                                               seq_lens=case.seq[case.nd:], block_tables=bt[case.nd:],
                                               max_query_len=case.k + 1, max_seq_len=case.L, return_lse=True,
                                               plan=plan_v, **kw)
                K.pillar_scores(case.q_v, p.k, query_start_loc=case.qsl_v, seq_lens=case.seq[case.nd:],
                                block_tables=bt[case.nd:], rows=torch.arange(case.nv, device=bt.device), lse=lse_v,
                                max_ctx=case.L, max_query_len=case.k + 1, out=case.layer_scores[layer], **kw)

            if variant in ON_TWO_STREAMS:  # the verify rows (and their scoring) beside the drafts: forked and joined
                main, side = torch.cuda.current_stream(), case.side_stream()
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    verify_and_score()
                drafts()
                main.wait_stream(side)
            else:
                drafts()
                verify_and_score()
        else:  # main's kernels
            _, lse = old["attention_triton"].unified_attention_triton(
                case.q, p.k, p.v, query_start_loc=case.qsl, seq_lens=case.seq, block_tables=bt,
                max_query_len=case.k + 1, max_seq_len=case.L, **sp, **kw)
        if variant.startswith("fused"):
            K.pillar_scores(case.q, p.k, query_start_loc=case.qsl, seq_lens=case.seq, block_tables=bt,
                            rows=case.score_rows, lse=lse, max_ctx=case.L, max_query_len=case.k + 1,
                            out=case.layer_scores[layer], **kw)
        elif variant == "main":
            old["pillars_triton"].pillar_scores_triton(
                case.q, p.k, query_start_loc=case.qsl, seq_lens=case.seq, block_tables=bt, rows=case.score_rows,
                lse=lse, max_ctx=case.L, out=case.layer_scores[layer], **kw)
    n = case.n_layers * case.nv
    flat = case.layer_scores.view(n, p.hkv, case.L)
    ctx, budget = case.ctx.repeat(case.n_layers), case.budget.repeat(case.n_layers)
    if variant == "main":
        return old["pillars_triton"].select_pillars_triton(flat, ctx, budget, 16, case.max_budget)
    return K.select_pillars(flat, ctx, budget, 16, case.max_budget)


VERIFY_TILES = ((32, 4, 2), (32, 8, 2), (64, 4, 2), (64, 8, 2), (64, 8, 3), (128, 8, 2))


def breakdown(case: StepCase, K, bench_ms, bw: float, old=None) -> dict:
    """The default (fused) step in parts, each timed alone: plan + attention of every layer, the scoring of every
    layer (from saved lse), the one selection; and the attention of the drafts alone and of the verify rows alone
    (one plan and launch each), each against its own K/V bytes (``bw`` bytes/s), so a miss names its part. With
    main's kernels (``old``), its attention, scoring and selection are timed the same way (``*_main_ms``), and the
    selection of every row by each of the two select kernels (resident bisection, radix)."""
    p = case.pool
    sp = dict(is_sparse=case.is_sparse, draft_start=case.draft_start, pillar_indices=case.pillars,
              pillar_lengths=case.pillar_len)
    plan_kw = {k: v for k, v in sp.items() if k != "pillar_indices"}
    lses = []

    def attend(keep=False):
        plan = K.attention_plan(case.q, p.k, query_start_loc=case.qsl, seq_lens=case.seq, max_query_len=case.k + 1,
                                max_pillars=case.pillars.shape[2], **plan_kw)
        for layer in range(case.n_layers):
            _, lse = K.unified_attention(case.q, p.k, p.v, query_start_loc=case.qsl, seq_lens=case.seq,
                                         block_tables=case.tables[layer], max_query_len=case.k + 1,
                                         max_seq_len=case.L, return_lse=True, plan=plan, scale=p.scale, **sp)
            if keep:
                lses.append(lse)

    def score():
        for layer in range(case.n_layers):
            K.pillar_scores(case.q, p.k, query_start_loc=case.qsl, seq_lens=case.seq, block_tables=case.tables[layer],
                            rows=case.score_rows, lse=lses[layer], max_ctx=case.L, max_query_len=case.k + 1,
                            out=case.layer_scores[layer], scale=p.scale)

    def score_main():
        for layer in range(case.n_layers):
            old["pillars_triton"].pillar_scores_triton(
                case.q, p.k, query_start_loc=case.qsl, seq_lens=case.seq, block_tables=case.tables[layer],
                rows=case.score_rows, lse=lses[layer], max_ctx=case.L, out=case.layer_scores[layer], scale=p.scale)

    def attend_main():
        for layer in range(case.n_layers):
            old["attention_triton"].unified_attention_triton(
                case.q, p.k, p.v, query_start_loc=case.qsl, seq_lens=case.seq, block_tables=case.tables[layer],
                max_query_len=case.k + 1, max_seq_len=case.L, scale=p.scale, **sp)

    def select(fn=None, **kw):
        n = case.n_layers * case.nv
        (fn or K.select_pillars)(case.layer_scores.view(n, p.hkv, case.L), case.ctx.repeat(case.n_layers),
                                 case.budget.repeat(case.n_layers), 16, case.max_budget, **kw)

    def score_shape(bn, t):  # a fixed scoring launch shape: bn-key tiles, t per program (the library autotunes it)
        from sparsespec_compile.kernels.pillars_triton import pillar_scores_triton

        for layer in range(case.n_layers):
            pillar_scores_triton(case.q, p.k, query_start_loc=case.qsl, seq_lens=case.seq,
                                 block_tables=case.tables[layer], rows=case.score_rows, lse=lses[layer],
                                 max_ctx=case.L, max_query_len=case.k + 1, out=case.layer_scores[layer],
                                 scale=p.scale, block_n=bn, tiles=t)

    def attend_kind(drafts: bool, verify_rows: str = "default", tile: tuple | None = None):
        n = slice(0, case.nd) if drafts else slice(case.nd, case.B)
        qsl = case.qsl_d if drafts else case.qsl_v
        extra = dict(is_sparse=case.is_sparse[n], draft_start=case.draft_start[n], pillar_lengths=case.pillar_len[n])
        mq = 1 if drafts else case.k + 1
        plan = K.attention_plan(case.q_d if drafts else case.q_v, p.k, query_start_loc=qsl, seq_lens=case.seq[n],
                                max_query_len=mq, block_q=None if drafts else case.verify_block_q(verify_rows),
                                **(dict(max_pillars=case.pillars.shape[2], **extra) if drafts else {}))
        for layer in range(case.n_layers):
            kw = dict(query_start_loc=qsl, seq_lens=case.seq[n], block_tables=case.tables[layer][n], max_query_len=mq,
                      max_seq_len=case.L, plan=plan, scale=p.scale,
                      **(dict(pillar_indices=case.pillars[n], **extra) if drafts else {}))
            if tile is None:
                K.unified_attention(case.q_d if drafts else case.q_v, p.k, p.v, **kw)
            else:  # a fixed tile config (BLOCK_N, warps, stages) instead of the autotuner's
                from sparsespec_compile.kernels.attention_triton import unified_attention_triton

                unified_attention_triton(case.q_v, p.k, p.v, block_n=tile[0], num_warps=tile[1], num_stages=tile[2],
                                         **kw)

    from sparsespec_compile.kernels.select_triton import RESIDENT_MAX, select_pillars_triton

    attend(keep=True)
    r = dict(attn_ms=bench_ms(attend), score_ms=bench_ms(score), select_ms=bench_ms(select))
    r["select_radix_ms"] = bench_ms(lambda: select(select_pillars_triton, method="radix"))
    if case.L <= RESIDENT_MAX:
        r["select_resident_ms"] = bench_ms(lambda: select(select_pillars_triton, method="resident"))
    if old is not None:
        r["attn_main_ms"] = bench_ms(attend_main)
        r["score_main_ms"] = bench_ms(score_main)
        r["select_main_ms"] = bench_ms(lambda: select(old["pillars_triton"].select_pillars_triton))
    layers_ms = case.n_layers * 1e3 / bw
    r["attn_drafts_ms"] = bench_ms(lambda: attend_kind(True))
    r["attn_drafts_x_floor"] = r["attn_drafts_ms"] / (p.kv_bytes(case.nd * (case.bud + 5)) * layers_ms)
    verify_floor = p.kv_bytes(case.nv * case.L) * layers_ms
    r["attn_verify_ms"] = bench_ms(lambda: attend_kind(False))
    r["attn_verify_x_floor"] = r["attn_verify_ms"] / verify_floor
    for rows in ("one_pass", "32"):  # the verify rows alone in a bigger block: fewer passes over their keys
        r[f"attn_verify_{rows}_ms"] = bench_ms(lambda: attend_kind(False, rows))
        r[f"attn_verify_{rows}_x_floor"] = r[f"attn_verify_{rows}_ms"] / verify_floor
    for tile in VERIFY_TILES:  # the one-pass block's tile configs (registers: a 64-row block is 4x a 16-row one's)
        try:
            r["attn_verify_one_pass_n{}w{}s{}_ms".format(*tile)] = bench_ms(lambda: attend_kind(False, "one_pass", tile))
        except Exception as e:  # noqa: BLE001 - an out-of-resources config: report, keep the others
            r["attn_verify_one_pass_n{}w{}s{}_ms".format(*tile)] = f"{type(e).__name__}: {str(e)[:120]}"
    ctx = case.L - case.k - 1
    score_bytes = case.nv * ctx * p.hkv * (p.d * p.k.element_size() + 2 * 4)  # K once, fp32 scores written + read
    r["score_x_floor"] = r["score_ms"] / (score_bytes * layers_ms)
    if old is not None:
        r["score_main_x_floor"] = r["score_main_ms"] / (score_bytes * layers_ms)
    from sparsespec_compile.kernels.pillars_triton import _scores_kernel_tuned

    best = getattr(_scores_kernel_tuned, "best_config", None)  # set once the autotuner ran (GPU)
    r["score_shape_tuned"] = f"N{best.kwargs['BLOCK_N']}x{best.kwargs['TILES']}/w{best.num_warps}" if best else None
    for bn, t in ((64, 1), (64, 4), (128, 2), (128, 8)):
        r[f"score_n{bn}x{t}_ms"] = bench_ms(lambda: score_shape(bn, t))
    return r


def bench_steps(pool, K, bench_ms, bw, row, log, shapes, n_layers, old=None):
    """Times every variant of each (B, L) in ``shapes``; checks that the variants select the same pillars."""
    for B, L in shapes:
        case = StepCase(pool, B, L, n_layers)
        floor, attn_floor = case.floor_bytes()
        picks, times = {}, {}
        for variant in STEP_VARIANTS + (("main",) if old else ()):
            if variant in ON_TWO_STREAMS and not torch.cuda.is_available():
                continue
            try:
                times[variant] = bench_ms(lambda: run_step(case, K, variant, old))
                picks[variant] = run_step(case, K, variant, old)
            except Exception as e:  # noqa: BLE001 - report, keep the other variants
                log(f"  step {variant} B{B} L{L} failed: {type(e).__name__}: {str(e)[:300]}")
        # the scores of a step differ only by rounding between variants: compare the selections' overlap
        ref = picks.get("fused")
        agree = {}
        for v, got in picks.items():
            if ref is not None:
                agree[v] = float((got[0] == ref[0]).float().mean())
        plan_ms = bench_ms(lambda: K.attention_plan(case.q, case.pool.k, query_start_loc=case.qsl, seq_lens=case.seq,
                                                    max_query_len=case.k + 1, is_sparse=case.is_sparse,
                                                    draft_start=case.draft_start, pillar_lengths=case.pillar_len,
                                                    max_pillars=case.pillars.shape[2]))
        fl = floor / bw * 1e3
        r = dict(kind="step", model=pool.name, B=B, L=L, layers=n_layers, verify_rows=case.nv, floor_ms=fl,
                 attn_floor_ms=attn_floor / bw * 1e3, plan_ms=plan_ms)
        for v, t in times.items():
            r[f"{v}_ms"] = t
            r[f"{v}_x_floor"] = t / fl
        r["select_agree"] = agree
        r.update(breakdown(case, K, bench_ms, bw, old))
        row(**r)
        del case


def bench_full_compare(pool, K, bench_ms, bw, row, old, cases):
    """Full-attention decode (q_len 1) and prefill chunks (q_len = L) through the new plan and main's kernel:
    ``cases`` = [(kind, B, L)]. The planned launch must be no slower."""
    for kind, B, L in cases:
        b = pool.batch(B, L, q_len=1 if kind == "decode" else L)
        new = bench_ms(lambda: pool.attend(b))
        r = dict(kind=f"{kind} new vs main", model=pool.name, B=B, L=L, new_ms=new,
                 floor_frac=pool.kv_bytes(B * L) / bw * 1e3 / new)
        if old is not None:
            kw = {k: v for k, v in b.items() if k != "q"}
            main_ms = bench_ms(lambda: old["attention_triton"].unified_attention_triton(
                b["q"], pool.k, pool.v, scale=pool.scale, **kw))
            r.update(main_ms=main_ms, new_over_main=new / main_ms)
        row(**r)
