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
    _REPORTS.append(report)
    del _REPORTS[:-_MAX_REPORTS]
    for hook in list(_REPORT_HOOKS):
        hook(report)
    if config.compiler == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    # Inductor's own config is left untouched; `mode` is honoured the way torch.compile would.
    config_patches = {"triton.cudagraphs": True} if mode in ("reduce-overhead", "max-autotune") else None
    if config_patches:
        return compile_fx(gm, example_inputs, config_patches=config_patches)
    return compile_fx(gm, example_inputs)


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
