"""Compile an unmodified Hugging Face model with the sparsespec backend; see what it rewrote.

    python examples/compile_and_inspect.py
"""

import torch

import sparsespec_compile  # optional: the torch_dynamo_backends entry point registers the backend
from sparsespec_compile.models import load_smollm2

# The embedded SmolLM2-135M-Instruct (no download). Yours: AutoModelForCausalLM.from_pretrained("path/to/model")
model, tok = load_smollm2()
# options={"compiler": "eager"} runs the rewritten graph without Inductor: on a CPU, Inductor's C++ build of this
# 30-layer model takes minutes. Leave options out to get Inductor.
compiled = torch.compile(model, backend="sparsespec", options={"compiler": "eager"})

input_ids = tok("The capital of France is", return_tensors="pt").input_ids
diff = (compiled(input_ids).logits - model(input_ids).logits).abs().max().item()  # gradients on: trainable as is
print(f"max |compiled(x) - model(x)| = {diff:.2e}")
print(sparsespec_compile.inspect(model))  # what was rewritten, what was left alone and why
