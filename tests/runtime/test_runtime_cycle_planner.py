"""CyclePlanner on its own: j per cycle (fixed and per-request), phase alignment, sitting out, acceptance counted."""

from sparsespec_compile.runtime.cycle_planner import CyclePlanner
from sparsespec_compile.runtime.request import Request, RequestState
from sparsespec_compile.runtime.sampling_params import SamplingParams
from sparsespec_compile.runtime.stride_policy import FixedStride


def _decoding(max_tokens=100, state=RequestState.DRAFT, drafts=4, done=0) -> Request:
    r = Request([1, 2, 3], SamplingParams(max_tokens=max_tokens))
    r.output_token_ids, r.num_computed_tokens = [7], 3
    r.state, r.num_cycle_drafts, r.draft_token_ids = state, drafts, [9] * done
    return r


class PerRequest:
    """A stride policy that gives each request the j it was told (mixed strides in one batch)."""

    adaptive = True

    def __init__(self, stride, j_of):
        self.stride, self.j_of, self.recorded = stride, j_of, []

    def options(self, r, j_max, num_decoding):
        return [min(self.j_of[r.request_id], j_max)]

    def refresh_after(self, r, j):
        return j > 0

    def record(self, r, drafted, accepted):
        self.recorded.append((r.request_id, drafted, accepted))


def test_fixed_stride_drafts_k_and_clips_at_the_length_limit():
    p = CyclePlanner(FixedStride(4), delayed_verify=False, max_model_len=64)
    r = _decoding()
    p.begin_cycles([r], step=10, running=[r])
    assert (r.num_cycle_drafts, r.state, r.cycle_refresh) == (4, RequestState.DRAFT, True)
    short = _decoding(max_tokens=3)  # 2 tokens left: one draft, whose verify emits up to 2
    p.begin_cycles([short], step=10, running=[short])
    assert short.num_cycle_drafts == 1
    last = _decoding(max_tokens=2)
    p.begin_cycles([last], step=10, running=[last])
    assert (last.num_cycle_drafts, last.state) == (0, RequestState.VERIFY)


def test_first_cycle_lands_on_the_least_loaded_phase():
    p = CyclePlanner(FixedStride(2), delayed_verify=False, max_model_len=64)  # C = 3 phases
    # others verify at steps 11 and 12 (phases 2 and 0): the free phase is 13 % 3 = 1 -> j = 2 from step 11
    a = _decoding(drafts=1, done=1)  # next verify at 11
    b = _decoding(drafts=2, done=1)  # next verify at 12
    r = _decoding()
    p.begin_cycles([r], step=10, running=[a, b, r], first=True)
    assert r.num_cycle_drafts == 2
    a.draft_token_ids = []  # now a verifies at 12 as well: phases 0 taken twice, 1 and 2 free -> prefer longest
    c = _decoding()
    p.begin_cycles([c], step=10, running=[a, b, c], first=True)
    assert c.num_cycle_drafts == 2


def test_delayed_verification_sits_out_and_can_stall_to_reach_the_last_phase():
    p = CyclePlanner(FixedStride(1), delayed_verify=True, max_model_len=64)  # C = 3: draft, verify, sit out
    assert p.cycle_len == 3 and p.sits_out_after_verify(1) and p.sits_out_after_verify(0)
    a = _decoding(drafts=0, state=RequestState.VERIFY)  # verifies at 11 (phase 2)
    b = _decoding(drafts=1)  # verifies at 12 (phase 0)
    r = _decoding()
    p.begin_cycles([r], step=10, running=[a, b, r], first=True)  # phase 1 (step 13) is reached by sitting out first
    assert r.state is RequestState.STALL and r.stall_until == 11


def test_mixed_strides_each_request_its_own_j_and_plain_decodes_never_sit_out():
    policy = PerRequest(3, {})
    p = CyclePlanner(policy, delayed_verify=True, max_model_len=64)
    reqs = [_decoding() for _ in range(3)]
    for r, j in zip(reqs, (0, 1, 3)):
        policy.j_of[r.request_id] = j
    p.begin_cycles(reqs, step=5, running=reqs)
    assert [r.num_cycle_drafts for r in reqs] == [0, 1, 3]
    assert [r.state for r in reqs] == [RequestState.VERIFY, RequestState.DRAFT, RequestState.DRAFT]
    assert [r.cycle_refresh for r in reqs] == [False, True, True]
    assert not p.sits_out_after_verify(0) and p.sits_out_after_verify(1)
    p.record_verify(reqs[2], 3, 2)
    assert reqs[2].metrics.drafted == [3] and reqs[2].metrics.accepted == [2]
    assert policy.recorded == [(reqs[2].request_id, 3, 2)]
