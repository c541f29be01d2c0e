"""Test-wide set-up. TRITON_INTERPRET must be set before anything imports triton: CI has no GPU, so the Triton
kernels run in the interpreter (upcast to fp32 after every load: its bf16 arithmetic is wrong)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Small, deterministic example counts: CI has 2 cores and a 15-minute budget for the whole suite.
settings.register_profile(
    "ci", max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread():
    """The suite's models are tiny: on 2 cores torch's intra-op threads only spin against each other (measured under
    load: one offloading step 240 ms with 2 threads, 6 ms with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_word_tokenizer(chat: bool = False):
    """A word-level tokenizer over the tiny models' 96 ids ("w0" .. "w95", space separated); ``chat``: with a chat
    template (each message's content, then "w1" opens the assistant turn)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)}, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w3", eos_token="w2")
    if chat:
        out.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                             "{% if add_generation_prompt %}w1{% endif %}")
    return out


@pytest.fixture(scope="session")
def word_tokenizer():
    return make_word_tokenizer(chat=True)
