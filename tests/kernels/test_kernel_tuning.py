"""Frozen autotuning (kernels/tuning.py): inside a step that runs once, no key is benchmarked except the first of a
kernel variant; other keys reuse the nearest tuned config of their variant."""

from types import SimpleNamespace

from sparsespec_compile.kernels import tuning


class FakeTuned:
    """What launch_tuned uses of a triton.autotune kernel: [grid](...) tunes and runs, best_config, configs, and
    .fn[grid](...) runs one given config."""

    def __init__(self, best_by_bucket):
        self.best_by_bucket, self.tunes, self.runs = best_by_bucket, [], []
        self.configs = [SimpleNamespace(kwargs={"BLOCK_N": 16}, num_warps=1, num_stages=1)]
        self.best_config = None
        outer = self

        class _Launch:
            def __getitem__(self, grid):
                def run(*args, **kw):
                    outer.runs.append((grid, kw))
                return run

        class _Tune:
            def __getitem__(self, grid):
                def run(*args, **meta):
                    outer.best_config = outer.best_by_bucket[args[0]]
                    outer.tunes.append(args[0])
                return run

        self.fn, self._tune = _Launch(), _Tune()

    def __getitem__(self, grid):
        return self._tune[grid]


def cfg(n):
    return SimpleNamespace(kwargs={"BLOCK_N": n}, num_warps=4, num_stages=2)


def test_frozen_launches_reuse_the_nearest_tuned_config_of_the_variant():
    tuning._chosen.pop("fake", None)
    t = FakeTuned({(1024, 8): cfg(64), (8192, 8): cfg(128), (2048, 4): cfg(32)})
    tuning.launch_tuned("fake", t, ("v",), (1024, 8), (1,), ((1024, 8),), {})  # unfrozen: tunes
    tuning.launch_tuned("fake", t, ("v",), (8192, 8), (1,), ((8192, 8),), {})
    assert t.tunes == [(1024, 8), (8192, 8)] and not t.runs
    with tuning.frozen_tuning():
        assert tuning.tuning_frozen()
        tuning.launch_tuned("fake", t, ("v",), (4096, 8), (1,), ((4096, 8),), {"X": 1})  # log2: 1 from 8192, 2 from 1024
        tuning.launch_tuned("fake", t, ("v",), (1024, 8), lambda m: (m["BLOCK_N"],), ((1024, 8),), {"X": 1})
        tuning.launch_tuned("fake", t, ("w",), (2048, 4), (1,), ((2048, 4),), {})  # a new variant: tuned once
    assert not tuning.tuning_frozen()
    assert t.tunes == [(1024, 8), (8192, 8), (2048, 4)]
    (g1, kw1), (g2, kw2) = t.runs
    assert kw1["BLOCK_N"] == 128 and kw1["num_warps"] == 4 and kw1["X"] == 1
    assert g2 == (64,) and kw2["BLOCK_N"] == 64  # its own tuned config; a callable grid sees the config's meta
