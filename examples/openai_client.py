# examples/openai_client.py
import os

from openai import OpenAI

# `sparsespec serve` listens on 127.0.0.1:8000; with --api-key KEY, pass api_key=KEY (any string otherwise)
client = OpenAI(base_url=os.environ.get("SPARSESPEC_URL", "http://127.0.0.1:8000/v1"),
                api_key=os.environ.get("SPARSESPEC_API_KEY", "none"))
model = client.models.list().data[0].id  # SmolLM2-135M-Instruct, or --served-model-name

reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is 7 times 8?"}],
                                       max_tokens=48, temperature=0)
print(repr(reply.choices[0].message.content), reply.choices[0].finish_reason, reply.usage.completion_tokens)

# streamed as server-sent events; stop strings, seed, and vLLM's top_k / ignore_eos (extra_body) work as in vLLM
stream = client.completions.create(model=model, prompt="The capital of France is", max_tokens=24, stream=True,
                                   temperature=0.7, top_p=0.95, seed=0, stop=["\n\n"], extra_body={"top_k": 50})
for chunk in stream:
    print(chunk.choices[0].text, end="", flush=True)
print(f"\n[{chunk.choices[0].finish_reason}]")
