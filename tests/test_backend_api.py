"""The backend at its API boundary: the entry point, options, and inputs it must refuse or leave alone clearly."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
import transformers

import sparsespec_compile
from sparsespec_compile.testing import FAMILIES, check_rewrite, tiny_model


class _TinySDPA(torch.nn.Module):
    """One causal SDPA over a linear projection: the cheapest graph with an attention node in it."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 24)

    def forward(self, x):  # x: [B, S, 8]
        q, k, v = self.proj(x).view(x.shape[0], x.shape[1], 3, 1, 8).unbind(2)  # each [B, S, 1, 8]
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)


def test_backend_found_through_entry_point_without_importing_us(tmp_path):
    """Regression: backend.py once registered itself while torch was loading the entry point, so torch's own
    register_backend raised 'duplicate name: sparsespec' in any process that had not imported us first."""
    script = textwrap.dedent(
        """
        import sys, torch
        import torch.nn.functional as F
        class M(torch.nn.Module):
            def forward(self, q, k, v):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        q, k, v = torch.randn(3, 1, 2, 5, 8).unbind(0)
        assert "sparsespec_compile" not in sys.modules
        out = torch.compile(M(), backend="sparsespec", options={"compiler": "eager"}, fullgraph=True)(q, k, v)
        assert "sparsespec_compile" in sys.modules, "the backend was not loaded through the entry point"
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=0, atol=0)
        import sparsespec_compile
        assert sparsespec_compile.last_report().num_rewritten == 1, sparsespec_compile.last_report()
        print("OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


def test_unknown_option_names_the_valid_ones():
    torch._dynamo.reset()
    compiled = torch.compile(_TinySDPA(), backend="sparsespec", options={"bogus": 1})
    with pytest.raises(Exception) as info:  # Dynamo wraps backend errors in BackendCompilerFailed
        compiled(torch.randn(1, 4, 8))
    torch._dynamo.reset()
    msg = str(info.value)
    assert "bogus" in msg and "valid options" in msg and "stride" in msg and "compiler" in msg, msg


@pytest.mark.parametrize("field,value", [("compiler", "tvm"), ("overlap", "yes"), ("fuse_projections", 1.5),
                                         ("cuda_graphs", "always")])
def test_invalid_option_value_is_a_clear_error(field, value):
    with pytest.raises(ValueError, match=f"SparseSpecConfig.{field}="):
        sparsespec_compile.SparseSpecConfig.from_options({field: value})


def test_model_without_attention_is_a_value_error():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="no attention found"):
        sparsespec_compile.inspect(mlp, torch.randn(2, 8))


def test_encoder_model_is_rewritten_but_reported_as_not_servable():
    config = transformers.BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    bert = transformers.BertModel(config, add_pooling_layer=False).eval()
    report = sparsespec_compile.inspect(bert, torch.randint(3, 96, (1, 7)))
    assert any("not a causal LM" in note for note in report.notes), str(report)
    assert "not a causal LM" in str(report)
    # the rewrite itself keeps the (bidirectional) semantics: logits equal, both layers rewritten
    result = check_rewrite(bert, {"input_ids": torch.randint(3, 96, (2, 7))})
    assert result.all_layers_rewritten and result.max_abs_diff == 0.0, result


def test_output_attentions_is_left_alone_with_a_reason():
    config = FAMILIES["llama"].config(layers=2, heads=4, kv_heads=2)
    model = tiny_model(config, "eager")
    inputs = {"input_ids": torch.randint(3, 96, (1, 6)), "output_attentions": True}
    result = check_rewrite(model, inputs, expect_rewritten=0)  # logits still compared (and equal)
    assert result.max_abs_diff == 0.0
    assert len(result.left_alone) == config.num_hidden_layers, result.left_alone
    assert all("several users" in why or "output_attentions" in why for why in result.left_alone), result.left_alone
    # and check_rewrite's default (all layers must be rewritten) reports exactly what was left alone
    with pytest.raises(AssertionError, match=r"0 attention node\(s\) rewritten, expected 2.*output_attentions"):
        check_rewrite(model, inputs)


def test_inplace_cache_write_survives_the_rewrite():
    """What HF's StaticCache does: write the new K/V into a persistent buffer in place, then attend over it.

    Regression: DeadCodePass once ran a graph-wide eliminate_dead_code, which erased the index_copy_ writes."""

    class StaticKV(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("keys", torch.zeros(1, 1, 8, 4))
            self.register_buffer("values", torch.zeros(1, 1, 8, 4))

        def forward(self, q, k, v, pos):  # q, k, v: [1, 1, S, 4]; pos: [S]
            self.keys.index_copy_(2, pos, k)
            self.values.index_copy_(2, pos, v)
            return F.scaled_dot_product_attention(q, self.keys[:, :, : pos.numel()], self.values[:, :, : pos.numel()])

    q, k, v = torch.randn(3, 1, 1, 5, 4).unbind(0)
    pos = torch.arange(5)
    expected = StaticKV()(q, k, v, pos)
    torch._dynamo.reset()
    got = torch.compile(StaticKV(), backend="sparsespec", options={"compiler": "eager"}, fullgraph=True)(q, k, v, pos)
    torch._dynamo.reset()
    torch.testing.assert_close(got, expected)


# ---- issue 15.7 -------------------------------------------------------------------------------------------------
def test_setting_only_min_budget_never_blames_recent():
    """SparseSpecConfig(min_budget=4) failed with 'recent=16: must be in [0, min_budget=4]'."""
    assert sparsespec_compile.SparseSpecConfig(min_budget=4).recent == 4
    assert sparsespec_compile.SparseSpecConfig().recent == 16
    with pytest.raises(ValueError, match=r"SparseSpecConfig.recent=9: must be in \[0, min_budget=4\]"):
        sparsespec_compile.SparseSpecConfig(min_budget=4, recent=9)  # set by the user: then it is the one to blame


def test_unknown_keyword_lists_the_valid_options():
    with pytest.raises(ValueError, match=r"unknown sparsespec option\(s\) \['foo'\]; valid options are: .*stride"):
        sparsespec_compile.SparseSpecConfig(foo=1)


@pytest.mark.parametrize("field,value,kind", [("sparsity", "0.1", "int or float"), ("stride", True, "int"),
                                              ("num_pages", 2.5, "int or None"), ("offload", 1, "bool")])
def test_wrong_type_names_the_field_and_the_type(field, value, kind):
    with pytest.raises(ValueError, match=f"SparseSpecConfig.{field}=.*must be {kind}, got"):
        sparsespec_compile.SparseSpecConfig(**{field: value})
