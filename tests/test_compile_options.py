"""Options given to torch.compile reach the runtime: runtime options are honoured by LLM(compiled), compile-time
options asked of an already compiled module and options given twice are refused with an error saying where."""

from __future__ import annotations

import pytest
import torch

from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig
from sparsespec_compile.compile_options import compile_options_of, resolve_config
from sparsespec_compile.testing import FAMILIES
from sparsespec_compile.testing.checks import tiny_model
from sparsespec_compile.testing.lossless import hf_greedy


@pytest.fixture(scope="module")
def model():
    return tiny_model(FAMILIES["llama"].config(layers=2, heads=4, kv_heads=2, head_dim=8), attn="sdpa", seed=0)


def _compiled(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="sparsespec", options={"compiler": "eager", **options})


def test_compile_options_are_read_back_from_the_compiled_module(model):
    assert compile_options_of(_compiled(model, stride=3)) == {"compiler": "eager", "stride": 3}
    assert compile_options_of(torch.compile(model, backend="sparsespec")) == {}
    assert compile_options_of(torch.compile(model, backend="eager")) is None  # not ours: nothing to carry
    assert compile_options_of(model) is None


def test_runtime_options_given_at_compile_time_are_honoured(model):
    prompt = list(range(5, 25))
    llm = LLM(_compiled(model, stride=3, adaptive=False, num_pages=64, page_size=4, min_budget=4, recent=1))
    assert (llm.config.stride, llm.config.compiler, llm.engine.scheduler.stride) == (3, "eager", 3)
    out = llm.generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)[0]
    assert out.token_ids == hf_greedy(model, prompt, 16)
    assert max(out.metrics["drafted"]) == 3  # full cycles drafted stride 3, not the default 8
    # with an LLM config too: its other options apply, the compile-time ones stay as compiled
    llm = LLM(_compiled(model, stride=3), SparseSpecConfig(num_pages=64, page_size=4, max_num_seqs=2))
    assert (llm.config.stride, llm.config.max_num_seqs, llm.config.compiler) == (3, 2, "eager")


def test_conflicting_or_misplaced_options_are_refused(model):
    with pytest.raises(ValueError, match=r"stride=3 at torch.compile vs 5 at LLM"):
        LLM(_compiled(model, stride=3), SparseSpecConfig(stride=5, num_pages=64))
    with pytest.raises(ValueError, match=r"fuse_projections=True is a compile-time option.*torch.compile\(model, "
                                         r"backend='sparsespec', options=\{'fuse_projections': True\}\)"):
        LLM(_compiled(model), SparseSpecConfig(fuse_projections=True, num_pages=64))
    with pytest.raises(ValueError, match="unknown sparsespec option"):  # at LLM(), before any graph is compiled
        LLM(_compiled(model, bogus=1))
    with pytest.raises(ValueError, match="SparseSpecConfig.stride"):
        resolve_config({"stride": -1}, None)
    assert resolve_config(None, None) == SparseSpecConfig()  # an uncompiled model: LLM compiles it with its config
