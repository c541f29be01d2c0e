"""Reporting: speed-ups within a group, the markdown table, the PNG, the JSON file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import HF_METHODS, JSON_NAME, METHODS


def add_speedups(records: list[dict]) -> None:
    """tokens/s over stride 0's and HF eager's in the same (batch, output length, temperature) group, and each
    request's tokens per step over what the same request got at stride 0 (same prompts, same order)."""
    key = lambda r: (r["batch"], r["output_len"], r["temperature"])  # noqa: E731
    ok = {(key(r), r["method"]): r for r in records if r.get("status") == "ok"}
    for r in records:
        if r.get("status") != "ok":
            continue
        for ref in ("stride0", "hf_eager"):
            b = ok.get((key(r), ref))
            r[f"speedup_vs_{ref}"] = r["tokens_per_s"] / b["tokens_per_s"] if b else None
        r["per_request_tokens_per_step_vs_stride0"] = _per_request_ratio(r, ok.get((key(r), "stride0")))


def _per_request_ratio(r: dict, base: dict | None) -> dict | None:
    mine, ref = r.get("per_request_tokens_per_step"), (base or {}).get("per_request_tokens_per_step")
    if not mine or not ref or len(mine) != len(ref):
        return None
    ratios = sorted(a / b for a, b in zip(mine, ref) if a is not None and b)
    if not ratios:
        return None
    n = len(ratios)
    return {"min": ratios[0], "p10": ratios[n // 10], "median": ratios[n // 2], "max": ratios[-1],
            "values": [a / b if a is not None and b else None for a, b in zip(mine, ref)]}


def _fmt(x, spec: str = ".2f", none: str = "–") -> str:
    return none if x is None else format(x, spec)


def _batch(r: dict) -> str:
    """Batch slots, and the request count when a queue kept them filled (--requests-per-slot > 1)."""
    n = r.get("requests", r["batch"])
    return str(r["batch"]) if n == r["batch"] else f"{r['batch']} ({n} requests)"


def _decode(r: dict) -> str:
    """Graphed (decode-only) step time and its floor fraction: the prefill chunks are out of these."""
    if r.get("decode_step_ms") is None:
        return "–"
    return f"{r['decode_step_ms']:.3f} / {r['decode_floor_fraction']:.3f}"


def markdown_table(result: dict) -> str:
    env, records = result["environment"], result["records"]
    lines = [
        "| method | batch | prompt len (mean) | tokens/request | temp | tokens/s | × stride0 | × HF eager | "
        "step ms | floor step ms | floor fraction | decode step ms / floor fraction | mean accepted | mean k | "
        "tokens/step | request tokens/step vs stride0 (min / median) | idle fraction | peak GiB | "
        "compiles / capture s in timed run | greedy agreement | draft recall (r vs accepted: requests / cycles) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in records:
        if r.get("status") != "ok":
            lines.append(f"| {r['method']} | {r['batch']} | – | {r['output_len']} | {r['temperature']} | "
                         f"{r.get('status')}: {r.get('reason', '')} |" + " |" * 15)
            continue
        tokens = str(r["generated_per_request"])
        if r["method"] in HF_METHODS and r["generated_per_request"] != r["output_len"]:
            tokens += f" (of {r['output_len']})"
        acc = None if r.get("mean_accepted") is None else f"{r['mean_accepted']:.2f} of {r['stride']}"
        peak = None if r.get("peak_memory_bytes") is None else r["peak_memory_bytes"] / 2**30
        lines.append(
            f"| {r['method']} | {_batch(r)} | {r['prompt_len_mean']:.0f} | {tokens} | {r['temperature']} | "
            f"{r['tokens_per_s']:.1f}{_spread(r)} | {_fmt(r.get('speedup_vs_stride0'))} | {_fmt(r.get('speedup_vs_hf_eager'))} | "
            f"{_fmt(r['step_ms'], '.3f')} | {_fmt(r['floor_step_ms'], '.3f')} | {r['floor_fraction']:.3f} | "
            f"{_decode(r)} | {acc or '–'} | {_fmt(r.get('mean_k'))} | {_fmt(r.get('tokens_per_step'))} | "
            f"{_vs_stride0(r)} | {_fmt(r.get('idle_fraction'))} | {_fmt(peak)} | "
            f"{r.get('graphs_compiled_in_timed_run', '–')} / {_fmt(r.get('capture_seconds_in_timed_run'), '.1f')} | "
            f"{_agreement(r)} | {_recall(r)} |")
    bw = env["copy_bandwidth_bytes_per_s"]
    notes = [
        f"Model: {env['model']}. Device: {env['device']}; torch {env['torch']}, triton {env['triton']}, "
        f"transformers {env['transformers']}, Python {env['python']}. Copy bandwidth (read + write bytes, best of "
        f"5): {bw / 1e12:.3f} TB/s. Prompts: {result['prompts']}.",
        "tokens/s = output tokens / wall time of one generate (prefill included) after a warm-up generate, less "
        "the time of CUDA-graph captures made during it (a one-off per shape, shown in its column); with --repeats, "
        "the median of the timed generates, their range in parentheses. HF runs "
        "generate the tokens/request shown (fewer than the runtime's: their steps are slow); × columns compare "
        "tokens/s within the same batch, output length and temperature. Floor = (steps × weight bytes + KV tokens "
        "read × KV bytes/token) / copy bandwidth; KV reads are the runtime's count when it reports one, else "
        "estimated from the request lengths (and cycles). Decode step: the graphed steps only (no prefill chunk), "
        "wall time per step against the same floor over those steps. Greedy agreement: requests identical to the reference "
        "over the common length / requests, with the first differing positions (bf16 near-ties can flip a token).",
        "mean k: drafts per cycle over every cycle (sparsespec chooses k per request and cycle, 0 = plain decode; "
        "pillar and streaming draft the fixed stride). tokens/step: output tokens / steps. Request tokens/step vs "
        "stride0: each request's output tokens per step of its decode (first token to finish) over the same "
        "request's at stride 0, min and median over the requests.",
        "draft recall: share of the verify queries' attention inside the key set the next draft uses (the scores "
        "of the verification; mean over layers, KV heads and verifications; per layer in the JSON), with Pearson's "
        "r against accepted drafts over requests (mean recall vs mean accepted per full cycle) and over cycles "
        "(a verification's recall vs the next cycle's accepted drafts). Streaming and full drafts score nothing.",
    ]
    skipped = result.get("skipped_methods") or {}
    notes += [f"{m} not run: {why}." for m, why in skipped.items()]
    return "\n".join(lines) + "\n\n" + "\n".join(f"* {n}" for n in notes) + "\n"


def _recall(r: dict) -> str:
    if r.get("mean_recall") is None:
        return "–"
    c = r.get("recall_vs_acceptance") or {}
    return (f"{r['mean_recall']:.3f} (r {_fmt(c.get('over_requests'))} over {c.get('requests', 0)} / "
            f"{_fmt(c.get('over_cycles'))} over {c.get('cycles', 0)})")


def _vs_stride0(r: dict) -> str:
    v = r.get("per_request_tokens_per_step_vs_stride0")
    return "–" if not v else f"{v['min']:.2f} / {v['median']:.2f}"


def _agreement(r: dict) -> str:
    parts = []
    for ref, c in (r.get("greedy_vs") or {}).items():
        firsts = [f for f in c["first_divergence"] if f is not None]
        s = f"vs {ref} {c['identical']}/{c['requests']}"
        if firsts:
            shown = ", ".join(map(str, sorted(firsts)[:6])) + (" …" if len(firsts) > 6 else "")
            s += f" (first diff at {shown})"
        gaps = [abs(m["gap"]) for m in c.get("margins") or []]
        if gaps:
            s += f", logit gap there ≤ {max(gaps):.3g}"
        parts.append(s)
    return "; ".join(parts) or "–"


def plot_results(result: dict | str | Path, out_png: str | Path) -> Path | None:
    """PNG of tokens/s vs batch size (largest output length) and vs output length (largest batch), one line per
    method and temperature; an axis with a single point is left out; a single cell is drawn as bars per method.
    None (with a warning) without matplotlib or without a successful run. Usable on a saved JSON: ``plot_results("e2e.json", "e2e.png")``."""
    if not isinstance(result, dict):
        result = json.loads(Path(result).read_text())
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib is not installed: no PNG (make it later with bench/plot_e2e.py on the JSON)",
              file=sys.stderr)
        return None
    ok = [r for r in result["records"] if r.get("status") == "ok"]
    batches = sorted({r["batch"] for r in ok})
    lens = sorted({r["output_len"] for r in ok})
    panels = []
    if len(batches) > 1:
        panels.append(("batch", "batch size", [r for r in ok if r["output_len"] == lens[-1]],
                       f"output length {lens[-1]}"))
    if len(lens) > 1:
        panels.append(("output_len", "output length (tokens per request)",
                       [r for r in ok if r["batch"] == batches[-1]], f"batch {batches[-1]}"))
    if not panels:  # one cell: tokens/s per method as bars, with the step time and its floor fraction
        return _plot_one_cell(plt, result, ok, out_png)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (key, label, rows, fixed) in zip(axes[0], panels):
        series: dict[tuple, list] = {}
        for r in rows:
            series.setdefault((r["method"], r["temperature"]), []).append((r[key], r["tokens_per_s"]))
        for (method, temp), pts in sorted(series.items(), key=lambda kv: (METHODS.index(kv[0][0]), kv[0][1])):
            pts.sort()
            name = f"{method} (T={temp:g})"
            if method in HF_METHODS:  # their shorter generation, said on the figure as in the table
                name += f", {min(r['generated_per_request'] for r in rows if r['method'] == method)} tok/request"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                    color=f"C{METHODS.index(method)}", linestyle="-" if temp == 0 else "--")
        ax.set_xlabel(label)
        ax.set_ylabel("output tokens/s")
        ax.set_xscale("log", base=2)
        xs = sorted({r[key] for r in rows})
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_title(f"{fixed}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    env = result["environment"]
    fig.suptitle(f"{env['model']} on {env['device']}", fontsize=10)
    return _save(plt, fig, out_png)


def _save(plt, fig, out_png: str | Path) -> Path:
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def _plot_one_cell(plt, result: dict, rows: list[dict], out_png: str | Path) -> Path | None:
    if not rows:
        print("warning: no successful run: nothing to plot", file=sys.stderr)
        return None
    rows = sorted(rows, key=lambda r: (METHODS.index(r["method"]), r["temperature"]))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    names = [f"{r['method']}\nT={r['temperature']:g}" for r in rows]
    bars = ax.bar(range(len(rows)), [r["tokens_per_s"] for r in rows],
                  color=[f"C{METHODS.index(r['method'])}" for r in rows])
    for b, r in zip(bars, rows):
        note = f"{r['tokens_per_s']:,.0f} tok/s"
        if r.get("step_ms") is not None:
            note += f"\n{r['step_ms']:.2f} ms/step"
        if r.get("mean_accepted") is not None:
            note += f"\nacc {r['mean_accepted']:.2f}/{r['stride']}"
        if r["method"] in HF_METHODS:
            note += f"\n({r['generated_per_request']} tok/req)"
        ax.annotate(note, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)), names, fontsize=8)
    ax.set_ylabel("output tokens/s")
    ax.set_ylim(0, 1.3 * max(r["tokens_per_s"] for r in rows))
    r0 = rows[0]
    env = result["environment"]
    ax.set_title(f"{env['model']} on {env['device']}\nbatch {r0['batch']}, {r0['output_len']} tokens/request",
                 fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(plt, fig, out_png)


def _json_ready(records: list[dict], save_tokens: bool) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens" or save_tokens} for r in records]


def write_json(result: dict, out: Path, save_tokens: bool) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / JSON_NAME
    data = {**result, "records": _json_ready(result["records"], save_tokens)}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)  # a run killed mid-write leaves the previous complete file
    return path


def _spread(r: dict) -> str:
    """' (min–max)' of the repeats' tokens/s when the cell was run more than once (--repeats)."""
    reps = r.get("repeat_tokens_per_s") or []
    return f" ({min(reps):.0f}–{max(reps):.0f})" if len(reps) > 1 else ""

