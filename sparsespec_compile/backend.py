"""The ``sparsespec`` torch.compile backend: ``(gm, example_inputs, **kwargs) -> callable``.

Registered twice, like any third-party Dynamo backend: through the ``torch_dynamo_backends`` entry point
(so ``torch.compile(model, backend="sparsespec")`` works without importing us) and with
``register_backend`` when this module is imported.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from torch import fx

from . import ops  # noqa: F401  (registers torch.ops.sparsespec.attention)
from .config import SparseSpecConfig
from .passes import PassManager, RewriteReport
from .passes.fuse_projections import FuseProjectionsPass

log = logging.getLogger("sparsespec")

_REPORTS: list[RewriteReport] = []  # one per compiled graph, newest last (read by inspect / LLM)
_MAX_REPORTS = 64


def sparsespec_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    options: dict[str, Any] | SparseSpecConfig | None = None,
    mode: str | None = None,
    **kwargs: Any,
) -> Callable[..., Any]:
    """Rewrite attention to ``sparsespec::attention``, then compile with Inductor (or run eagerly)."""
    if kwargs:
        raise TypeError(f"sparsespec backend got unexpected arguments {sorted(kwargs)}; pass knobs via options={{...}}")
    config = SparseSpecConfig.from_options(options)
    report = PassManager()(gm)
    fuse = None  # adds graph inputs (fused weights), appended to every call
    if config.fuse_projections:
        # on a copy: the pass adds graph inputs, and Dynamo reads its own graph's inputs after the backend returns
        gm = fx.GraphModule(gm, _copy_graph(gm.graph))
        fuse = FuseProjectionsPass()
        fuse(gm, example_inputs)
        report.passes.append((fuse.name, fuse.matched))
        report.notes += fuse.notes
        gm.graph.lint()
        gm.recompile()
    _REPORTS.append(report)
    del _REPORTS[:-_MAX_REPORTS]
    for hook in list(_REPORT_HOOKS):
        hook(report)
    if config.compiler == "eager":
        return _with_fused_inputs(gm.forward, fuse)
    from torch._inductor.compile_fx import compile_fx

    # Inductor's own config is left untouched; `mode` is honoured the way torch.compile would.
    config_patches = {"triton.cudagraphs": True} if mode in ("reduce-overhead", "max-autotune") else None
    extra = fuse.extra_inputs if fuse is not None else []
    return _with_fused_inputs(compile_fx(gm, list(example_inputs) + extra, config_patches=config_patches), fuse)


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    return new


def _with_fused_inputs(fn: Callable[..., Any], fuse: FuseProjectionsPass | None) -> Callable[..., Any]:
    """``fn`` with the fused weights appended to its inputs, each brought up to date with the weights of this call
    first (a weight changed in place or replaced since the compile is seen; the check costs ~1.3 µs per fused group
    per call on a 2-core CPU)."""
    if fuse is None or not fuse.extra_inputs:
        return fn
    extra = fuse.extra_inputs

    def call(*args: Any) -> Any:
        fuse.refresh(args)
        return fn(*args, *extra)

    return call


_REPORT_HOOKS: list[Callable[[RewriteReport], None]] = []


def last_report() -> RewriteReport | None:
    """Report of the most recently compiled graph (``None`` before any compile)."""
    return _REPORTS[-1] if _REPORTS else None


class capture_reports:
    """``with capture_reports() as reports: compiled(x)`` collects the reports of the graphs compiled inside."""

    def __enter__(self) -> list[RewriteReport]:
        self.reports: list[RewriteReport] = []
        _REPORT_HOOKS.append(self.reports.append)
        return self.reports

    def __exit__(self, *exc: object) -> None:
        _REPORT_HOOKS.remove(self.reports.append)


def _register() -> None:
    from torch._dynamo.backends.registry import _BACKENDS, _COMPILER_FNS, register_backend

    # When torch itself is loading us through the entry point, _BACKENDS holds that (not yet loaded) entry
    # point and torch registers the function right after the import returns: registering here too would make
    # torch's own register_backend fail with "duplicate name".
    if "sparsespec" not in _COMPILER_FNS and _BACKENDS.get("sparsespec") is None:
        register_backend(name="sparsespec")(sparsespec_backend)


_register()
