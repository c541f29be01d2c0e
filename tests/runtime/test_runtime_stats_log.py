"""The step loop's progress log (runtime/stats_log.py): one line per interval, of the interval's own counters."""

import logging

import pytest

from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig
from sparsespec_compile.runtime.stats_log import StatsLog, format_line
from sparsespec_compile.testing import FAMILIES, tiny_model


def test_line_is_the_interval_delta():
    prev = {"steps": 100, "output_tokens": 1000, "request_steps": 6400, "seconds": 1.0, "schedule_seconds": 0.1,
            "launch_seconds": 0.2, "resolve_seconds": 0.3, "wait_seconds": 0.1, "graph_steps": 90,
            "cycles_by_k": [10, 0, 5], "position_drafted": [5, 5], "position_accepted": [4, 2], "all_cycles": 15,
            "cuda_graphs": 4, "capture_seconds": 1.0, "compile_steps": 1, "compile_seconds": 3.0}
    cur = dict(prev, steps=200, output_tokens=3000, request_steps=12800, schedule_seconds=0.2, launch_seconds=0.4,
               resolve_seconds=0.8, wait_seconds=0.35, graph_steps=190, cycles_by_k=[20, 0, 15],
               position_drafted=[15, 15], position_accepted=[12, 6], all_cycles=35, cuda_graphs=6,
               capture_seconds=1.5, step_cost=[1.2e-3, 8e-7, 7e-9, 2e-8])
    line = format_line(prev, cur, 2.0, running=64, waiting=3)
    assert "steps 100 (50.0/s)" in line
    assert "out 1.0k tok/s" in line  # 2,000 tokens in 2 s
    assert "running 64 waiting 3" in line and "64.0 req/step" in line and "graphed 100%" in line
    assert "k 1.00 acc 0.60" in line  # 10 plain + 10 two-draft cycles; 12 of 20 drafts accepted
    assert "schedule 1.00 launch 2.00 resolve 5.00 (wait 2.50)" in line  # ms per step of the interval
    assert "graphs 6 (+2, 0.5 s)" in line and "compiles 1 (+0.0 s)" in line
    assert "prices 1.20 ms + 0.80 us/tok + 7.0 ns/key + 20.0 ns/sparse key" in line


def test_llm_logs_progress_at_its_interval(caplog):
    model = tiny_model(FAMILIES["llama"].config(layers=2, heads=4, kv_heads=2), "sdpa", seed=0)
    cfg = SparseSpecConfig(stride=2, compiler="eager", min_budget=4, recent=1, page_size=4, num_pages=64,
                           max_num_seqs=4, log_stats_interval=1e-9)
    llm = LLM(model, cfg)
    with caplog.at_level(logging.INFO, logger="sparsespec.runtime"):
        llm.generate([[1, 2, 3, 4]] * 2, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("steps ")]
    assert lines and all("tok/s" in ln and "host ms/step" in ln for ln in lines)
    assert any("prices" in ln for ln in lines)  # the default is adaptive: its fitted prices are shown


def test_interval_must_be_positive():
    with pytest.raises(ValueError, match="log_stats_interval"):
        SparseSpecConfig(log_stats_interval=0)
    assert StatsLog(10.0, dict, lambda: (0, 0)).maybe_log() is None  # the first call only takes the baseline
