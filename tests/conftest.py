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


# ---- the embedded real models' first load, in the background --------------------------------------------------
# The first load of an embedded model dequantizes its GGUF and caches fp32 safetensors (sparsespec_compile/models.py):
# ~65-120 s for Gemma3-270M, ~30 s for SmolLM2 on 2 cores, then a few seconds per load. A fresh CI machine has no
# cache, and the suite runs on one core (one intra-op thread): so when tests that load them are selected, a child
# process makes the caches at the start of the session, on the other core, while the kernel tests run. The tests
# then load from the cache (which is what the first load itself ends with: _load_cached reads back what it wrote).
# Nothing is hidden: the fixture below only waits; if the child failed, the test's own load makes the cache (or
# fails with the loader's error) exactly as it would have without the child.
EMBEDDED_CACHES = ("smollm2-135m-instruct-q4_1", "gemma3-270m-q4_k_m")  # _load_cached's names, in load order
_embedded_warmup = None


def _missing_embedded_caches():
    from sparsespec_compile.models import cache_dir

    return [name for name in EMBEDDED_CACHES if not (cache_dir() / name / "model.safetensors").is_file()]


def pytest_collection_finish(session):
    global _embedded_warmup
    if not any("embedded_models_cached" in getattr(item, "fixturenames", ()) for item in session.items):
        return
    if not _missing_embedded_caches():
        return
    import subprocess
    import sys

    code = ("import torch; torch.set_num_threads(1)\n"
            "from sparsespec_compile.models import load_gemma3, load_smollm2\n"
            "load_smollm2(); load_gemma3()\n")  # SmolLM2 first: test_examples.py needs it before test_gemma3.py
    _embedded_warmup = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)


def pytest_sessionfinish(session):
    proc = _embedded_warmup
    if proc is not None and proc.poll() is None:  # the session ended before a test needed the caches
        proc.terminate()
        proc.wait()
        import shutil

        from sparsespec_compile.models import cache_dir

        for tmp in cache_dir().glob(f"*.tmp{proc.pid}*"):  # its unfinished cache (_load_cached's temporary names)
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def embedded_models_cached():
    """Wait for the background first load of the embedded models (above), if one runs."""
    import subprocess

    if _embedded_warmup is not None:
        try:
            _embedded_warmup.wait(timeout=1200)
        except subprocess.TimeoutExpired:  # stuck: the test's own load does the work (and reports its errors)
            _embedded_warmup.kill()
            _embedded_warmup.wait()
