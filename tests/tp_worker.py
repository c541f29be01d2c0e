"""Run by tests/test_tensor_parallel.py under ``torchrun --nproc-per-node N`` (gloo, CPU): load a saved tiny model
with HF ``tp_plan="auto"``, generate with the sparsespec runtime, write this rank's outputs as JSON."""

import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig  # noqa: E402


def main(model_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=torch.float32).eval()
    llm = LLM(model, SparseSpecConfig(stride=3, min_budget=3, recent=1, compiler="eager", num_pages=64, page_size=4))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], list(range(20, 40))]
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    unseeded = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)  # ranks' generators differ
    outs = llm.generate(prompts + prompts[:1], [greedy] * 3 + [unseeded], use_tqdm=False)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"tokens": [o.token_ids for o in outs], "reasons": [o.finish_reason for o in outs],
                   "world": dist.get_world_size(), "tp": llm.engine.tp_world}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
