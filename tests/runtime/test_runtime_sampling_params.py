import pytest

from sparsespec_compile.runtime.sampling_params import SamplingParams


def test_defaults_are_greedy():
    p = SamplingParams()
    assert p.greedy and p.max_tokens == 256 and p.top_k == 0 and p.top_p == 1.0 and p.stop_token_ids == ()


def test_stop_token_ids_list_becomes_tuple_and_params_stay_hashable():
    p = SamplingParams(stop_token_ids=[3, 4])
    assert p.stop_token_ids == (3, 4)
    hash(p)


@pytest.mark.parametrize("kw, field", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=-3), "max_tokens"), (dict(max_tokens=2.5), "max_tokens"),
    (dict(max_tokens=True), "max_tokens"),
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature="0.6"), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=-1), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(top_k=1.0), "top_k"),
    (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"), (dict(seed=2**63), "seed"),
    (dict(stop_token_ids=[1, -2]), "stop_token_ids"), (dict(stop_token_ids=5), "stop_token_ids"),
    (dict(stop_token_ids=["a"]), "stop_token_ids"),
    (dict(ignore_eos=1), "ignore_eos"),
])
def test_invalid_values_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


def test_frozen():
    with pytest.raises(Exception):
        SamplingParams().temperature = 1.0  # type: ignore[misc]
