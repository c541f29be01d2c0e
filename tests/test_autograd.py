"""``torch.compile(model, backend="sparsespec")`` on a model in its default state (gradients on): the forward works
and the rewritten graph is trainable, with the original attention's gradients (issue 15.2)."""

from __future__ import annotations

import pytest
import torch

from sparsespec_compile.testing import FAMILIES, tiny_model


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Leave no compiled frames behind: Dynamo marks a float attribute (the attention scale) dynamic when a later
    compile of the same code sees another value, and the rewrite leaves a symbolic scale alone."""
    yield
    torch._dynamo.reset()


def _grads(model, fn, ids):
    model.zero_grad(set_to_none=True)
    out = fn(ids).logits
    out.float().pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("gemma2", "eager"), ("mistral", "eager")])
def test_backward_equals_the_original_models(family, attn):
    """GQA (llama), softcap and a non-default scale (gemma2), a sliding-window mask tensor (mistral)."""
    torch._dynamo.reset()
    fam = FAMILIES[family]
    model = tiny_model(fam.config(layers=2, heads=4, kv_heads=2), attn)  # eval: dropout off, grad on
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    want_out, want = _grads(model, model, ids)
    compiled = torch.compile(model, backend="sparsespec", options={"compiler": "eager"})
    got_out, got = _grads(model, compiled, ids)
    torch.testing.assert_close(got_out, want_out)
    assert got.keys() == want.keys() and len(got) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_readme_first_snippet_with_inductor_and_grad_enabled():
    """The README's ``compiled(input_ids)`` as pasted: Inductor, gradients on (BackendCompilerFailed before)."""
    torch._dynamo.reset()
    model = tiny_model(FAMILIES["llama"].config(layers=1, heads=2, kv_heads=1), "sdpa").eval()
    ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, backend="sparsespec")
    out = compiled(ids).logits
    assert out.requires_grad  # (its backward is compiled on first use: the eager-backend tests above check it)
    torch.testing.assert_close(out, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_runtime_path_has_no_backward():
    """With a runtime ForwardContext (paged cache, sparse drafts) the op refuses a backward instead of faking one."""
    from sparsespec_compile import ops
    from sparsespec_compile.context import forward_context

    class AutogradCtx:  # what torch.library hands setup_context / backward
        needs_input_grad = (True,) * 9

        def save_for_backward(self, *tensors):
            self.saved_tensors = tensors

    q = k = v = torch.randn(1, 2, 3, 4)
    grad_ctx = AutogradCtx()
    with forward_context(object()):
        ops._setup_attention_backward(grad_ctx, (q, k, v, None, 0, 0.5, True, 0.0, ops.MATH_SDPA), None)
    with pytest.raises(RuntimeError, match="no backward"):
        ops._attention_backward(grad_ctx, torch.zeros(1, 2, 3, 4))
