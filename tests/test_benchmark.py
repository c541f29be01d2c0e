"""CPU smoke test of the end-to-end benchmark (``sparsespec bench``): a 2-layer random Llama, batch 2, 8 tokens,
HF eager vs the runtime at stride 0 / PillarAttn / streaming, compiler eager. In fp32 on the CPU every greedy output
must be identical: the runtime's plain decoding equals HF ``generate``, speculation equals plain decoding."""

from __future__ import annotations

import json

import pytest
import torch

from sparsespec_compile import benchmark

FIELDS = ("method", "batch", "output_len", "temperature", "status", "seconds", "output_tokens", "tokens_per_s",
          "steps", "step_ms", "floor_seconds", "floor_step_ms", "floor_fraction", "kv_tokens_read",
          "mean_accepted", "idle_fraction", "peak_memory_bytes", "generated_per_request",
          "graphs_compiled_in_timed_run", "speedup_vs_stride0", "speedup_vs_hf_eager")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    md = out / "RESULTS.md"
    argv = ["--model", "tiny-random", "--device", "cpu", "--batch-sizes", "1", "2", "--output-lens", "8",
            "--prompt-len", "12", "--methods", "hf_eager", "stride0", "sparsespec", "pillar", "streaming", "hybrid", "--temperature", "0",
            "--compiler", "eager", "--stride", "3", "--min-budget", "6", "--recent", "2", "--hf-max-tokens", "8",
            "--warmup-tokens", "4", "--save-tokens", "--out", str(out), "--results-md", str(md)]
    assert benchmark.main(argv) == 0
    return out, md, json.loads((out / benchmark.JSON_NAME).read_text())


def test_records_have_the_fields(run):
    _, _, result = run
    env = result["environment"]
    for key in ("device", "torch", "triton", "transformers", "date", "command", "copy_bandwidth_bytes_per_s"):
        assert env.get(key), key
    records = result["records"]
    assert [(r["batch"], r["method"]) for r in records] == [
        (b, m) for b in (1, 2) for m in ("hf_eager", "stride0", "sparsespec", "pillar", "streaming", "hybrid")]
    for r in records:
        assert r["status"] == "ok", r
        missing = [f for f in FIELDS if f not in r]
        assert not missing, (r["method"], missing)
        assert r["output_tokens"] == r["batch"] * 8 and r["tokens_per_s"] > 0 and r["floor_fraction"] > 0
        assert r["graphs_compiled_in_timed_run"] == 0, r  # the warm-up compiled everything the timed run needed
        assert r["speedup_vs_stride0"] is not None and r["speedup_vs_hf_eager"] is not None
    by = {(r["batch"], r["method"]): r for r in records}
    assert by[(2, "pillar")]["mean_accepted"] is not None and by[(2, "pillar")]["cycles"] > 0
    assert by[(2, "stride0")]["kv_tokens_read"] > 0
    assert 1 <= by[(2, "pillar")]["mean_requests_per_step"] <= 2  # batch occupancy: at most the batch
    spread = by[(2, "pillar")]["per_request_accepted"]
    assert spread["requests"] == 2 and spread["min"] <= spread["median"] <= spread["max"]
    assert by[(2, "stride0")]["per_request_accepted"] is None
    # telemetry: the k chosen per cycle, tokens per step, each request's tokens per step against stride 0's
    for m in ("sparsespec", "pillar"):
        r = by[(2, m)]
        assert sum(r["cycles_by_k"]) > 0 and 0 <= r["mean_k"] <= 3 and len(r["per_position_acceptance_all"]) == 3
        vs = r["per_request_tokens_per_step_vs_stride0"]
        assert len(vs["values"]) == 2 and 0 < vs["min"] <= vs["median"] <= vs["max"]
    assert by[(2, "pillar")]["mean_k"] > 0 and by[(2, "stride0")]["mean_k"] == 0
    assert by[(2, "stride0")]["per_request_tokens_per_step_vs_stride0"]["values"] == [1.0, 1.0]


def test_draft_recall_in_the_records(run):
    """Scored drafts report their recall per layer (2 layers) and its correlation with acceptance; streaming none."""
    _, _, result = run
    by = {(r["batch"], r["method"]): r for r in result["records"]}
    for m in ("pillar", "hybrid"):
        r = by[(2, m)]
        assert len(r["recall_by_layer"]) == 2 and all(0.0 <= x <= 1.0 for x in r["recall_by_layer"]), m
        assert 0.0 <= r["mean_recall"] <= 1.0 and len(r["per_request_recall"]) == 2
        assert r["recall_vs_acceptance"]["requests"] == 2
        assert r["stats"]["recall_verifies"] > 0
    assert by[(2, "streaming")]["mean_recall"] is None and by[(2, "streaming")]["recall_vs_acceptance"] is None


def test_greedy_outputs_identical(run):
    """fp32 CPU: stride 0 == HF eager token for token; PillarAttn and streaming drafts == stride 0."""
    _, _, result = run
    by = {(r["batch"], r["method"]): r for r in result["records"]}
    for b in (1, 2):
        assert by[(b, "stride0")]["tokens"] == by[(b, "hf_eager")]["tokens"]
        assert by[(b, "stride0")]["greedy_vs"]["hf_eager"]["identical"] == b
        for m in ("sparsespec", "pillar", "streaming", "hybrid"):
            assert by[(b, m)]["tokens"] == by[(b, "stride0")]["tokens"], m
            assert by[(b, m)]["greedy_vs"]["stride0"]["first_divergence"] == [None] * b


def test_markdown_and_png(run):
    out, md, _ = run
    text = md.read_text()
    assert "### End-to-end benchmark" in text and "sparsespec bench --model tiny-random" in text
    assert text.count("| pillar |") == 2 and text.count("| sparsespec |") == 2 and "tokens/s" in text
    pytest.importorskip("matplotlib")  # the `bench` extra (scripts/setup.sh installs it); without it: no PNG
    png = out / benchmark.PNG_NAME
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_static_compile_is_skipped_on_cpu_by_default():
    args = benchmark.parse_args(["--device", "cpu"])
    methods, skipped = benchmark.select_methods(args, torch.device("cpu"))
    assert "hf_static_compile" not in methods and "hf_static_compile" in skipped


def test_kv_read_estimates():
    assert benchmark.plain_kv_tokens_read([10], 3) == 11 + 12  # tokens 1 and 2 read 11 and 12 keys
    from sparsespec_compile import SparseSpecConfig

    cfg = SparseSpecConfig(stride=2, min_budget=4, recent=1)
    # one cycle of 2 drafts on a context of 11 (prompt 10 + the prefill's token), both accepted: drafts read
    # B(11)=4 and 4+1, the verify 11+2+1; then 3 tokens are covered, the 4th is a plain step on 11+3 keys.
    assert benchmark.spec_kv_tokens_read(10, 5, [2], [2], cfg) == 4 + 5 + 14 + 14


def test_cli_forwards_bench(capsys):
    from sparsespec_compile.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0 and "--hf-max-tokens" in capsys.readouterr().out


def test_divergence_margins_measure_the_tie_where_two_runs_part():
    """At a forced divergence from the greedy reference, the reference token is the argmax: gap >= margin >= 0."""
    from sparsespec_compile.testing.checks import tiny_model
    from sparsespec_compile.testing import FAMILIES
    from sparsespec_compile.testing.lossless import hf_greedy

    fam = FAMILIES["llama"]
    model = tiny_model(fam.config(layers=2, heads=4, kv_heads=2, head_dim=8), attn="sdpa", seed=0)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    ref = [hf_greedy(model, p, 6) for p in prompts]
    other = [list(ref[0]), list(ref[1])]
    other[1][3] = (ref[1][3] + 1) % model.config.vocab_size
    first = [benchmark.first_divergence(a, b) for a, b in zip(other, ref)]
    (m,) = benchmark.divergence_margins(model, prompts, other, ref, first)
    assert (m["request"], m["position"]) == (1, 3) and m["gap"] >= m["margin"] >= 0
    with torch.no_grad():
        logits = model(torch.tensor([prompts[1] + ref[1][:3]])).logits[0, -1]
    assert m["gap"] == pytest.approx(float(logits[ref[1][3]] - logits[other[1][3]]), abs=1e-5)


def test_one_cell_is_drawn_as_bars(run, tmp_path):
    """A run of one batch size and one output length (what a 10-minute device call fits) still gets a PNG."""
    pytest.importorskip("matplotlib")
    _, _, result = run
    one = {**result, "records": [r for r in result["records"] if r["batch"] == 2]}
    png = benchmark.plot_results(one, tmp_path / "one.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_requests_per_slot_keeps_the_slots_filled(tmp_path):
    """--requests-per-slot 2: twice the requests through the same batch slots (max_num_seqs = batch), every one
    finishes with all its tokens, a step never runs more than the batch, and greedy output still equals HF's."""
    argv = ["--model", "tiny-random", "--device", "cpu", "--batch-sizes", "2", "--requests-per-slot", "2",
            "--output-lens", "6", "--prompt-len", "10", "--methods", "hf_eager", "stride0", "pillar",
            "--temperature", "0", "--compiler", "eager", "--stride", "2", "--min-budget", "4", "--recent", "2",
            "--hf-max-tokens", "6", "--warmup-tokens", "2", "--save-tokens", "--out", str(tmp_path)]
    assert benchmark.main(argv) == 0
    by = {r["method"]: r for r in json.loads((tmp_path / benchmark.JSON_NAME).read_text())["records"]}
    assert by["hf_eager"]["requests"] == 2 and len(by["hf_eager"]["tokens"]) == 2
    for m in ("stride0", "pillar"):
        r = by[m]
        assert r["status"] == "ok" and r["requests"] == 4 and r["output_tokens"] == 4 * 6
        assert 0 < r["mean_requests_per_step"] <= 2
        assert r["tokens"][:2] == by["hf_eager"]["tokens"]
    assert by["pillar"]["tokens"] == by["stride0"]["tokens"]


def test_oversubscribed_kv_pool_finishes_every_request_losslessly(tmp_path):
    """--kv-pool-fraction 0.5 (2x oversubscription): the device pool holds half the batch's demand; every request
    still finishes with all its tokens and greedy output equals HF's (offload restores KV, never recomputes it)."""
    argv = ["--model", "tiny-random", "--device", "cpu", "--batch-sizes", "3", "--kv-pool-fraction", "0.5",
            "--page-size", "4", "--output-lens", "8", "--prompt-len", "10", "--methods", "hf_eager", "stride0",
            "pillar", "--temperature", "0", "--compiler", "eager", "--stride", "2", "--min-budget", "4",
            "--recent", "2", "--hf-max-tokens", "8", "--warmup-tokens", "2", "--save-tokens", "--out", str(tmp_path)]
    assert benchmark.main(argv) == 0
    by = {r["method"]: r for r in json.loads((tmp_path / benchmark.JSON_NAME).read_text())["records"]}
    demand = 3 * -(-(10 + 8 + 2 + 2) // 4)  # pages for every request's whole context (pillar's stride 2)
    for m in ("stride0", "pillar"):
        r = by[m]
        assert r["status"] == "ok" and r["output_tokens"] == 3 * 8 and r["kv_pool_fraction"] == 0.5
        assert r["kv_pages"] <= -(-demand // 2)
        assert r["tokens"] == by["hf_eager"]["tokens"], m
    assert by["stride0"]["offloads"] + by["pillar"]["offloads"] > 0  # the pool really ran short


def test_repeats_report_the_median_and_every_repeat(tmp_path):
    """--repeats 3: three timed generates per cell in the same LLM; the record is the median one (its tokens/s lies
    within the repeats'), every repeat's tokens/s is kept, the outputs are the same greedy tokens, and the table
    shows the range."""
    argv = ["--model", "tiny-random", "--device", "cpu", "--batch-sizes", "2", "--output-lens", "6", "--prompt-len",
            "10", "--methods", "hf_eager", "stride0", "sparsespec", "--temperature", "0", "--compiler", "eager",
            "--stride", "2", "--min-budget", "4", "--recent", "2", "--hf-max-tokens", "6", "--warmup-tokens", "2",
            "--repeats", "3", "--save-tokens", "--out", str(tmp_path), "--results-md", str(tmp_path / "R.md")]
    assert benchmark.main(argv) == 0
    by = {r["method"]: r for r in json.loads((tmp_path / benchmark.JSON_NAME).read_text())["records"]}
    assert by["hf_eager"]["repeat_tokens_per_s"] is None
    for m in ("stride0", "sparsespec"):
        reps = by[m]["repeat_tokens_per_s"]
        assert len(reps) == 3 and all(x > 0 for x in reps)
        assert sorted(reps)[1] == pytest.approx(by[m]["tokens_per_s"])
        assert by[m]["tokens"] == by["hf_eager"]["tokens"]
    md = (tmp_path / "R.md").read_text()
    lo, hi = min(by["stride0"]["repeat_tokens_per_s"]), max(by["stride0"]["repeat_tokens_per_s"])
    assert f"({lo:.0f}–{hi:.0f})" in md


def test_stats_delta_gives_the_timed_runs_own_ratios():
    """Counters of the timed generate alone, and the per-step ratios from them: a warm-up that held the full stride
    (fewer requests a step) must not leak into the timed run's requests per step."""
    from sparsespec_compile.benchmark.run import stats_delta

    before = {"steps": 100, "request_steps": 2000, "output_tokens": 3000, "mean_requests_per_step": 20.0}
    after = {"steps": 300, "request_steps": 2000 + 200 * 256, "output_tokens": 3000 + 200 * 256,
             "mean_requests_per_step": (2000 + 200 * 256) / 300}
    d = stats_delta(before, after)
    assert d["steps"] == 200 and d["request_steps"] == 200 * 256
    assert d["mean_requests_per_step"] == 256 and d["tokens_per_request_step"] == 1.0 and d["tokens_per_step"] == 256
