"""``run_checks``: every check ``sparsespec check`` runs, one row each, for CLIs and CI scripts.

    rows = run_checks(model)            # causal LM, rewrite coverage, logits, greedy lossless, sampling, recompiles
    print(format_table(rows)); sys.exit(0 if all(r.ok for r in rows) else 1)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

MAX_GRAPHS = 3  # measured: 2 (a static graph for the first step, then one graph dynamic in the token count T)


class _Skip(Exception):
    """A check that cannot run because one it builds on failed."""


@dataclass
class CheckRow:
    name: str
    ok: bool | None  # None: skipped (an earlier check it depends on failed)
    detail: str
    seconds: float = 0.0

    @property
    def status(self) -> str:
        return {True: "PASS", False: "FAIL", None: "SKIP"}[self.ok]


def run_checks(
    model: torch.nn.Module,
    *,
    stride: int = 4,
    budget: int = 8,
    max_new_tokens: int = 16,
    compiler: str = "eager",
    num_cycles: int = 50_000,
    num_requests: int = 64,
    max_graphs: int = MAX_GRAPHS,
    progress: Callable[[str], None] | None = None,
) -> list[CheckRow]:
    """Run the checks in order; a failure is a row (with the check's message), never an exception.

    progress: called with each check's name before it runs (a progress bar's hook).
    """
    from sparsespec_compile import inspect

    from .checks import check_rewrite
    from .lossless import check_lossless
    from .sampling import check_sampling

    from sparsespec_compile.runtime.servable import check_model

    rows: list[CheckRow] = []
    layers = model.config.get_text_config().num_hidden_layers
    lossless = {}
    servable: list[bool] = []

    def causal() -> str:
        try:
            check_model(model)
        except ValueError as exc:
            raise AssertionError(f"not a causal LM sparsespec can serve: {exc}") from None
        servable.append(True)
        return f"{type(model).__name__}: causal (later positions do not change earlier logits), with an LM head"

    def needs_causal(fn: Callable[[], str]) -> Callable[[], str]:
        def run() -> str:
            if not servable:
                raise _Skip("needs a causal LM (see the first row)")
            return fn()
        return run

    def coverage() -> str:
        report = inspect(model)
        if report.num_rewritten != layers:
            left = [f"{r.node}: {r.reason}" for r in report.left_alone]
            raise AssertionError(f"{report.num_rewritten}/{layers} attention layers rewritten; left alone: {left}")
        return f"{layers}/{layers} attention layers rewritten"

    def logits() -> str:
        return str(check_rewrite(model, compiler=compiler)).split(": ", 1)[1]

    def greedy() -> str:
        lossless["result"] = r = check_lossless(model, stride=stride, budget=budget, max_new_tokens=max_new_tokens,
                                                compiler=compiler, dense_drafts=True)
        return (f"{r.num_tokens} tokens of {r.num_requests} requests == HF greedy (stride {stride}, budget "
                f"{budget}, acceptance {r.acceptance:.2f}); dense-draft acceptance {r.dense_acceptance:.2f}")

    def sampling() -> str:
        r = check_sampling(model, stride=min(stride, 4), num_cycles=num_cycles, num_requests=num_requests)
        return (f"{r.num_cycles} cycles: min slot p-value {min(r.slot_pvalues):.2g}, max TV {max(r.slot_tv):.3f}, "
                f"acceptance {r.acceptance:.3f} (theory {r.acceptance_expected:.3f}); engine PIT p-value "
                f"{r.engine_pvalue:.2g} over {r.engine_tokens} tokens")

    def recompiles() -> str:
        r = lossless.get("result")
        if r is None:
            raise _Skip("needs the greedy lossless run")
        detail = f"{r.graphs_compiled} graph(s) compiled for {len(r.token_counts)} distinct token counts"
        if r.graphs_compiled > max_graphs:
            raise AssertionError(f"{detail} (limit {max_graphs}): Dynamo recompiles as the step's token count "
                                 "changes (TORCH_LOGS=recompiles shows why)")
        return f"{detail} (limit {max_graphs})"

    checks: Iterable[tuple[str, Callable[[], str]]] = (
        ("causal LM", causal),
        ("rewrite coverage", coverage),
        ("logits equivalence", logits),
        ("greedy lossless (sparse drafts)", needs_causal(greedy)),
        ("sampling distribution", needs_causal(sampling)),
        ("recompilation count", recompiles),
    )
    for name, fn in checks:
        if progress is not None:
            progress(name)
        t0 = time.perf_counter()
        try:
            ok, detail = True, fn()
        except _Skip as exc:
            ok, detail = None, str(exc)
        except AssertionError as exc:
            ok, detail = False, str(exc)
        except Exception as exc:  # a crash is a failed check, reported like one
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        rows.append(CheckRow(name, ok, detail, time.perf_counter() - t0))
    return rows


def format_table(rows: list[CheckRow], width: int = 100) -> str:
    """A plain-text pass/fail table; a failed row's message follows in full under the table."""
    name_w = max(len(r.name) for r in rows)
    lines = [f"{'check':<{name_w}}  status  time    detail", f"{'-' * name_w}  ------  ------  {'-' * 20}"]
    for r in rows:
        first = r.detail.splitlines()[0] if r.detail else ""
        if len(first) > width:
            first = first[: width - 3] + "..."
        lines.append(f"{r.name:<{name_w}}  {r.status:<6}  {r.seconds:5.1f}s  {first}")
    for r in rows:
        if r.ok is False:
            lines += ["", f"{r.name} FAILED:", r.detail]
    passed = sum(r.ok is True for r in rows)
    lines += ["", f"{passed}/{len(rows)} checks passed"]
    return "\n".join(lines)


__all__ = ["CheckRow", "MAX_GRAPHS", "format_table", "run_checks"]
