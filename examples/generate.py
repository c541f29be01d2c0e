"""Sparse self-speculative generation with ``LLM`` on the embedded SmolLM2-135M-Instruct.

    python examples/generate.py
"""

from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig
from sparsespec_compile.models import load_smollm2

model, tok = load_smollm2()  # yours: AutoModelForCausalLM.from_pretrained(...) and AutoTokenizer.from_pretrained(...)
# A small pillar budget so that drafts are sparse on short contexts (the paper's 128 would cover them); the pool
# is sized explicitly (512 pages of 16 tokens) rather than from the machine's memory.
# adaptive=False drafts k = 4 every cycle; the default (adaptive) picks each request's k per cycle from its acceptance
# and the measured step cost, and on a CPU, where a step costs about the same whatever it holds, mostly decodes plainly.
config = SparseSpecConfig(stride=4, adaptive=False, min_budget=16, compiler="eager", num_pages=512)
llm = LLM(model, config, tokenizer=tok)

prompts = ["What is 7 times 8?", "Name the three primary colors."]
params = SamplingParams(max_tokens=32, temperature=0.6, top_p=0.95, seed=0)
# An Instruct model needs its chat template (without it SmolLM2 answers with an empty string)
for out in llm.generate(prompts, params, use_chat_template=True, use_tqdm=False):
    print(f"[{out.finish_reason}] {out.text!r} (mean accepted {out.metrics['mean_accepted']:.2f} of {config.stride})")
stats = llm.stats()
print(f"{stats['tokens_per_s']:.1f} tokens/s, mean accepted {stats['mean_accepted']:.2f} of {config.stride}")

# vLLM / HF habits: chat messages, streaming, stop strings, log-probs, per-call stats
(reply,) = llm.chat([{"role": "user", "content": "Say hello in French."}], SamplingParams(max_tokens=16), use_tqdm=False)
print(repr(reply.text))
for event in llm.generate_stream(["Count from 1 to 10."], SamplingParams(max_tokens=48, stop=["5"], logprobs=1),
                                 use_chat_template=True):
    print(event.text, end="", flush=True)  # final tokens only, as they are decided
    if event.finished:
        print(f"\n[{event.output.finish_reason}: {event.output.stop_reason!r}] log-prob of the first token "
              f"{event.output.logprobs[0][event.output.token_ids[0]]:.2f}")
print(llm.stats(reset=True)["tokens_per_s"])  # since the previous reset, without compile time; then counts afresh
