"""``check_sampling``: speculative sampling reproduces the target model's distribution (statistically).

Two stages, both fast on a tiny model (~2 s on one CPU core):

* sampler: the model's own logits at the last ``k + 1`` prompt positions are the target ``p_i``; the same model
  reading only the newer half of the prompt gives the drafts ``q_i`` (a stand-in for a sparse draft: the same
  weights, less context, so ``q`` differs from ``p`` by a realistic amount). ``num_cycles`` independent
  draft/verify cycles through ``runtime.verify`` (``sample`` then ``rejection_sample``); at every slot the emitted
  tokens must fit ``p_i`` (chi-square p-value and total-variation distance) and the first draft must be accepted
  at its theoretical rate ``sum_x min(p_1, q_1)``. A residual sampled from ``p`` instead of ``max(p - q, 0)`` fails
  here by a wide margin.
* engine: ``num_requests`` seeded requests of one prompt through ``LLM`` with sparse drafts; each emitted token's
  randomized probability-integral transform ``u = F(x-) + U * p(x)`` under the model's own conditional ``p`` (one
  HF forward over the outputs) is Uniform(0, 1) and independent of the earlier ones, so the pooled ``u`` must fit
  a uniform histogram; their mean surprise ``-log p(x)`` must match the target entropy (z-test: tokens drawn from
  the draft instead of the target shift it); and no emitted token may have target probability 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ALPHA = 1e-6  # a correct sampler fails a check with probability ~1e-6 per test (seeds are fixed: deterministic)
Z_MAX = 5.0  # two-sided normal tail at 5 sigma: ~6e-7


def chi2_sf(stat: float, df: int) -> float:
    """P(chi2_df > stat): the regularized upper incomplete gamma Q(df/2, stat/2)."""
    if df < 1:
        return 1.0
    q = torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64))
    return float(q)


def tv_noise(p: torch.Tensor, n: int) -> float:
    """Expected TV distance between ``n`` exact samples of ``p`` and ``p`` itself (normal approximation):
    0.5 * sum_x E|count_x / n - p_x| = 0.5 * sqrt(2 / pi) * sum_x sqrt(p_x (1 - p_x) / n)."""
    p = p.double()
    return 0.5 * (2 / torch.pi) ** 0.5 * (p * (1 - p) / max(n, 1)).sqrt().sum().item()


def goodness_of_fit(samples: torch.Tensor, p: torch.Tensor, min_expected: float = 5.0) -> tuple[float, float]:
    """(chi-square p-value, total-variation distance) of integer ``samples`` against the distribution ``p [V]``.

    Bins expected to hold fewer than ``min_expected`` samples are pooled into one (the chi-square approximation
    needs it); a sample of a token with ``p == 0`` gives p-value 0.
    """
    n = samples.numel()
    if n == 0:
        return 1.0, 0.0
    counts = torch.bincount(samples.flatten().cpu(), minlength=p.numel()).double()
    p = p.double().cpu()
    tv = 0.5 * (counts / n - p).abs().sum().item()
    if counts[p == 0].sum() > 0:
        return 0.0, tv
    big = n * p >= min_expected
    obs = torch.cat([counts[big], counts[~big & (p > 0)].sum().view(1)])
    exp = torch.cat([n * p[big], (n * p[~big & (p > 0)]).sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum().item()
    return chi2_sf(stat, int(keep.sum()) - 1), tv


@dataclass
class SamplingCheck:
    """What ``check_sampling`` measured (it raises before returning if a bound failed)."""

    stride: int
    num_cycles: int
    slot_pvalues: list[float]  # per draft slot: chi-square p-value of emitted tokens vs p_i
    slot_tv: list[float]  # per draft slot: total-variation distance
    acceptance: float  # measured rate of accepting the first draft
    acceptance_expected: float  # sum_x min(p_1(x), q_1(x))
    engine_tokens: int = 0
    engine_pvalue: float = 1.0  # uniformity of the pooled PIT values of the engine's tokens
    engine_z: float = 0.0  # pooled surprise minus entropy, in standard errors
    failures: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        s = (f"check_sampling[stride {self.stride}]: {self.num_cycles} cycles, slot p-values "
             f"{[f'{p:.2g}' for p in self.slot_pvalues]}, TV {[round(t, 4) for t in self.slot_tv]}, acceptance "
             f"{self.acceptance:.4f} (theory {self.acceptance_expected:.4f})")
        if self.engine_tokens:
            s += (f"; engine: {self.engine_tokens} tokens, PIT p-value {self.engine_pvalue:.2g}, surprise z "
                  f"{self.engine_z:+.2f}")
        return s


def check_sampling(
    model: torch.nn.Module,
    *,
    stride: int = 3,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_cycles: int = 50_000,
    max_tv: float = 0.01,
    num_requests: int = 128,
    max_tokens: int = 8,
    budget: int = 2,
    prompt_len: int = 16,
    max_vocab: int = 64,
    seed: int = 0,
    alpha: float = ALPHA,
) -> SamplingCheck:
    """Assert that speculative sampling with this model emits tokens distributed as the target's softmax.

    temperature / top_k / top_p: the ``SamplingParams`` under test (both draft and target get them).
    num_cycles: independent draft/verify cycles of the sampler stage. ``max_tv``: how far each slot's empirical
        distribution may be from ``p_i`` beyond sampling noise (TV bound = ``max_tv + 1.5 * tv_noise``; the noise of
        17k samples over 96 tokens is ~0.02 on its own).
    num_requests: requests of the engine stage (0 skips it), ``max_tokens`` each, drafting with ``budget`` pillars.
    max_vocab: models with a larger vocabulary are tested on the union of the target's and the drafts' top tokens
        (the sampler's math does not depend on V; the memory of ``num_cycles x V`` would).
    Raises AssertionError listing every failed bound.
    """
    from sparsespec_compile import SamplingParams

    if temperature <= 0:
        raise ValueError("check_sampling needs temperature > 0 (greedy decoding is check_lossless's job)")
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
    check = _sampler_stage(model, prompt, params, stride, num_cycles, max_vocab, seed, alpha, max_tv)
    if num_requests:
        _engine_stage(model, prompt, params, stride, num_requests, max_tokens, budget, seed, alpha, check)
    if check.failures:
        raise AssertionError("speculative sampling does not reproduce the target distribution:\n  "
                             + "\n  ".join(check.failures) + f"\n({check})")
    return check


def _sampler_stage(model, prompt, params, k, n, max_vocab, seed, alpha, max_tv) -> SamplingCheck:
    from sparsespec_compile.runtime import verify

    if len(prompt) < k + 3:
        raise ValueError(f"prompt_len must be >= stride + 3 = {k + 3}")
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    with torch.no_grad():
        target = model(ids).logits[0, -(k + 1):].float().cpu()  # [k+1, V] p_i: the full context
        draft = model(ids[:, len(prompt) // 2:]).logits[0, -(k + 1):-1].float().cpu()  # [k, V] q_i: newer half
    if target.shape[-1] > max_vocab:  # the union of each distribution's top tokens, at every slot
        half = max_vocab // 2
        keep = torch.unique(torch.cat([target.topk(half, -1).indices.flatten(),
                                       draft.topk(half, -1).indices.flatten()]))
        target, draft = target[:, keep], draft[:, keep]
    v = target.shape[-1]
    gen = verify.make_generator(seed, "cpu")
    d, q = verify.sample(draft.repeat(n, 1), params, generator=gen)  # [n*k], stats [n*k, 5]
    # every cycle reads the same k draft rows and k + 1 target rows: indices, not n copies
    drafts = verify.Drafts(draft, q.view(n, k, -1)[0], torch.arange(k).expand(n, k))
    accepted, out = verify.rejection_sample(d.view(n, k), drafts, target, params, generator=gen,
                                            target_index=torch.arange(k + 1).expand(n, k + 1))  # [n], [n, k+1]
    st = verify.SamplingTensors.build(params, 1, v, "cpu")
    p = verify.probs_from_logits(target[None], st)[0]  # [k+1, V']
    q1 = verify.probs_from_logits(draft[None], st)[0, 0]  # [V']
    check = SamplingCheck(stride=k, num_cycles=n, slot_pvalues=[], slot_tv=[],
                          acceptance=(accepted >= 1).double().mean().item(),
                          acceptance_expected=torch.minimum(p[0], q1).sum().item())
    for i in range(k + 1):  # slot i is emitted by every cycle that accepted >= i drafts, and must be ~ p_i
        rows = accepted >= i
        pval, tv = goodness_of_fit(out[rows, i], p[i])
        bound = max_tv + 1.5 * tv_noise(p[i], int(rows.sum()))
        check.slot_pvalues.append(pval)
        check.slot_tv.append(tv)
        if pval < alpha or tv > bound:
            check.failures.append(f"sampler slot {i}: emitted tokens do not fit the target p_{i}: chi-square "
                                  f"p-value {pval:.3g} (bound {alpha:g}), TV {tv:.4f} (bound {bound:.4f}), "
                                  f"{int(rows.sum())} samples")
    # binomial std of the acceptance rate is <= 0.5 / sqrt(n): 6 sigma
    if abs(check.acceptance - check.acceptance_expected) > 3 / n ** 0.5:
        check.failures.append(f"sampler: first draft accepted at rate {check.acceptance:.4f}, theory "
                              f"sum min(p, q) = {check.acceptance_expected:.4f}")
    return check


def _engine_stage(model, prompt, params, k, n, max_tokens, budget, seed, alpha, check) -> None:
    from sparsespec_compile import SamplingParams
    from sparsespec_compile.runtime import verify

    from .lossless import make_llm

    prompts = [prompt] * n
    llm = make_llm(model, prompts, max_tokens, stride=k, budget=budget, fresh=False)  # reuse cached graphs
    try:
        per = [SamplingParams(max_tokens=max_tokens, temperature=params.temperature, top_k=params.top_k,
                              top_p=params.top_p, seed=seed * 100_003 + i, ignore_eos=True) for i in range(n)]
        outs = llm.generate(prompts, per, use_tqdm=False)
    finally:
        torch._dynamo.reset()
    bad = [f"request {i}: {o.finish_reason}" for i, o in enumerate(outs) if o.finish_reason != "length"]
    if bad:
        check.failures.append(f"engine: requests did not finish: {bad[:3]}")
        return
    device = next(model.parameters()).device
    seqs = torch.tensor([prompt + o.token_ids for o in outs], device=device)  # [n, L + T]
    L, T = len(prompt), max_tokens
    with torch.no_grad():
        logits = model(seqs).logits[:, L - 1:L + T - 1].float().cpu()  # [n, T, V] p(. | prefix) of each token
    st = verify.SamplingTensors.build(params, n * T, logits.shape[-1], "cpu")
    p = verify.probs_from_logits(logits.reshape(n * T, -1), st)  # [n*T, V]
    x = seqs[:, L:].reshape(-1, 1).cpu()  # [n*T, 1]
    px = p.gather(-1, x).squeeze(-1)
    outside = int((px <= 0).sum())
    if outside:
        check.failures.append(f"engine: {outside} emitted token(s) have target probability 0 (filtered out by "
                              f"top-k / top-p): the draft's filters or residual leak into the output")
    jitter = torch.rand(n * T, generator=torch.Generator().manual_seed(seed))
    u = (p.cumsum(-1).gather(-1, x).squeeze(-1) - px) + jitter * px  # F(x-) + U p(x) ~ Uniform(0, 1) if x ~ p
    bins = 16
    pval, _ = goodness_of_fit((u.clamp(0, 1 - 1e-9) * bins).long(), torch.full((bins,), 1 / bins))
    # Surprise test: -log p(x_t) - H(p_t) has mean 0 given the prefix when x_t ~ p_t (a martingale difference), so
    # the pooled sum over variance is ~N(0, 1); tokens from another distribution r shift it by H(r, p) - H(p).
    logp = p.clamp_min(1e-30).log()
    entropy = -(p * logp).sum(-1)  # [n*T]
    var = (p * logp ** 2).sum(-1) - entropy ** 2
    surprise = -logp.gather(-1, x).squeeze(-1).masked_fill(px <= 0, 0.0)
    z = ((surprise - entropy).sum() / var.sum().clamp_min(1e-12).sqrt()).item()
    check.engine_tokens, check.engine_pvalue, check.engine_z = n * T, pval, z
    if pval < alpha:
        check.failures.append(f"engine: tokens do not follow the model's conditionals (PIT uniformity p-value "
                              f"{pval:.3g} over {n * T} tokens)")
    if abs(z) > Z_MAX:
        check.failures.append(f"engine: mean surprise -log p(x) of the {n * T} emitted tokens is {z:+.1f} standard "
                              f"errors from the target entropy (bound {Z_MAX}): they are drawn from "
                              f"{'a flatter' if z > 0 else 'a sharper'} distribution than the target's")


__all__ = ["SamplingCheck", "check_sampling", "chi2_sf", "goodness_of_fit", "tv_noise"]
