"""What ``LLM(model)`` decides at construction: the KV pool's size, and which models it refuses to serve."""

from __future__ import annotations

import pytest

from sparsespec_compile import LLM, SparseSpecConfig
from sparsespec_compile.testing import FAMILIES, tiny_model
from sparsespec_compile.testing.families import MAX_POSITIONS


def _llama(**kw):
    return tiny_model(FAMILIES["llama"].config(layers=2, heads=4, kv_heads=2, **kw), "sdpa")


def test_default_pool_is_what_the_requests_can_need():
    """Issue 15.1: the default pool took half of the machine's memory on a CPU (1.49 M pages for a toy model)."""
    config = SparseSpecConfig(compiler="eager", max_num_seqs=3, stride=4, page_size=16)
    llm = LLM(_llama(), config)
    per_request = -(-(MAX_POSITIONS + config.stride + 1) // config.page_size)
    assert llm.engine.kv.num_pages == 3 * per_request
    assert llm.engine.offload.num_pages <= llm.engine.kv.num_pages
