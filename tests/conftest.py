"""Test-wide set-up. TRITON_INTERPRET must be set before anything imports triton: CI has no GPU, so the Triton
kernels run in the interpreter (upcast to fp32 after every load: its bf16 arithmetic is wrong)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The subprocesses the suite starts (the users' CI file, bench.sh, bench/sampler.py, `sparsespec serve`, the
# process engine's child) inherit this: one intra-op thread, like this process (one_intra_op_thread below). With
# two, a subprocess that shares the 2 cores with anything else spins (examples/test_my_model.py: 54-96 s vs 32 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")

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


@pytest.fixture(scope="session")
def word_tokenizer():
    from word_tokenizer import make_word_tokenizer

    return make_word_tokenizer(chat=True)
