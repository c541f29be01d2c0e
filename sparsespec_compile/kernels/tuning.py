"""Autotuning where it is paid once, never inside a serving step that runs only once.

The attention and pillar-scoring launches are autotuned per shape key (a context bucket, a work bucket, the kernel
variant). A CUDA-graph decode step tunes its keys once, while the graph is captured, and replays them for free. A
step that is not graphed (a prefill chunk in it) has an exact shape, and a new key there benchmarks every config
inside the step: on the H200 (SmolLM2, B 256, bench/RESULTS.md) the adaptive default's prefill steps, which mix in
sparse and scored rows, cost 482 ms each against stride 0's 54 ms — 14 s of a 71 s run.

So the runtime runs those steps under :func:`frozen_tuning`: a key the autotuner has already measured is launched
with its own config, and a new key with the config measured for the nearest key of the same kernel variant (the
same constexprs: nothing new is compiled). A variant never tuned before (the first prefill of its kind) is tuned
once, as its compile is paid once. The autotuners keep their choices on disk where Triton can
(:func:`autotune_cache_kwargs`), so a later process benchmarks none of the keys an earlier one measured.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

_frozen = 0
# kernel name -> {(variant, buckets): triton.Config}: every config an autotuned launch chose, by our own key
_chosen: dict[str, dict[tuple, Any]] = {}


@contextlib.contextmanager
def frozen_tuning() -> Iterator[None]:
    """Within this block autotuned launches benchmark nothing (see the module docstring)."""
    global _frozen
    _frozen += 1
    try:
        yield
    finally:
        _frozen -= 1


def tuning_frozen() -> bool:
    return _frozen > 0


def autotune_cache_kwargs() -> dict:
    """``triton.autotune`` keywords that keep its choices on disk (Triton's cache directory) where this Triton
    supports it (``cache_results``): a key measured by an earlier process is not benchmarked again."""
    import inspect

    import triton

    return {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


def _distance(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    return sum(abs(math.log2(max(x, 1)) - math.log2(max(y, 1))) for x, y in zip(a, b))


def launch_tuned(name: str, tuned, variant: tuple, buckets: tuple[int, ...], grid: tuple | Callable,
                 args: tuple, meta: dict) -> None:
    """Launch ``tuned`` (a ``triton.autotune`` kernel) on ``grid`` — or, under :func:`frozen_tuning`, its
    underlying kernel with a config already chosen. ``variant``: the key's constexpr part (the same compiled
    kernel family); ``buckets``: its size part (powers of two), compared by log distance."""
    table = _chosen.setdefault(name, {})
    if not _frozen:
        tuned[grid](*args, **meta)
        table[(variant, buckets)] = tuned.best_config
        return
    cfg = table.get((variant, buckets))
    if cfg is None:
        near = [(key[1], c) for key, c in table.items() if key[0] == variant]
        if not near:  # a variant never tuned (the first prefill of its kind): tune it once, as a compile is paid once
            tuned[grid](*args, **meta)
            table[(variant, buckets)] = tuned.best_config
            return
        cfg = min(near, key=lambda kc: _distance(kc[0], buckets))[1]
    kwargs = dict(cfg.kwargs)
    g = grid(dict(meta, **kwargs)) if callable(grid) else grid
    tuned.fn[g](*args, **kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **meta)
