"""End-to-end benchmark: the same workload run several ways in one process (``sparsespec bench``).

Methods (``--methods``):

* ``hf_eager``: Hugging Face ``model.generate`` (SDPA, dynamic cache), left-padded batch;
* ``hf_static_compile``: HF's static cache + torch.compile (``cache_implementation="static"``, ``compile_config=
  CompileConfig(fullgraph=True, mode="reduce-overhead")``: see ``_static_compile_kwargs`` for why not the guide's
  ``model.forward = torch.compile(...)``); CUDA graphs, so skipped on the CPU unless named explicitly;
* ``stride0``: our runtime without speculation (plain decoding, same scheduler and kernels);
* ``pillar``: sparse self-speculation with PillarAttn drafts (SparseSpec);
* ``streaming``: the same with StreamingLLM drafts (sinks + recent window at the same budget, MagicDec-like);
* ``hybrid``: sinks + recent window + pillars at the same budget, split from the verify queries' attention
  (``--hybrid-split``).

Every (output length, batch, temperature, method) cell builds a fresh ``LLM``, warms it up (compiles), then times
one ``generate``. Reported per cell: output tokens/s, step time against the bytes-moved floor (weights + KV read
per step, at the copy bandwidth measured in the same run), mean accepted length, draft recall per layer (and its correlation with acceptance), GPU idle fraction (when the
runtime reports it), peak memory, and for greedy cells where each request first differs from the stride-0
output (bf16 near-ties can flip a token; they are reported, never forced). The HF baselines are slow, so they
generate ``--hf-max-tokens`` tokens per request; the table says so in its own column.

Writes ``e2e.json`` (every cell + the environment) and ``e2e.png`` (tokens/s vs batch size and vs output length)
under ``--out``, prints a markdown table and appends it to ``--results-md`` when given.

    sparsespec bench --model smollm2 --batch-sizes 16 32 64 --output-lens 1024 4096 --out bench_out/e2e
    python -m sparsespec_compile.benchmark ...   # the same

Modules: ``run`` (cells, the main loop), ``args`` (the command line), ``models`` (models, checkpoints under
torchrun, prompts), ``agreement`` (greedy comparisons), ``hf`` (HF baselines), ``floor`` (bandwidth, bytes, step
floor), ``report`` (table, PNG, JSON), ``recall`` (draft recall vs acceptance), ``common`` (shared names).
"""

from .common import JSON_NAME, METHODS, PNG_NAME
from .floor import floor_seconds, kv_bytes_per_token, measure_copy_bandwidth, plain_kv_tokens_read, spec_kv_tokens_read
from .report import add_speedups, markdown_table, plot_results, write_json
from .agreement import compare, divergence_margins, first_divergence
from .args import parse_args
from .run import main, select_methods

__all__ = ["JSON_NAME", "METHODS", "PNG_NAME", "add_speedups", "compare", "divergence_margins", "first_divergence",
           "floor_seconds", "kv_bytes_per_token", "main", "markdown_table", "measure_copy_bandwidth", "parse_args",
           "plain_kv_tokens_read", "plot_results", "select_methods", "spec_kv_tokens_read", "write_json"]
