"""KVManager on its own: offload keeps everything, restore puts it back, a full host pool falls back to a drop."""

from sparsespec_compile.runtime.block_allocator import BlockAllocator
from sparsespec_compile.runtime.kv_manager import KVManager
from sparsespec_compile.runtime.request import Request, RequestState
from sparsespec_compile.runtime.sampling_params import SamplingParams
from sparsespec_compile.runtime.step_plan import StepPlan


def _running(kv: KVManager, prompt_len: int, state=RequestState.DRAFT, drafts=()) -> Request:
    r = Request(list(range(1, prompt_len + 1)), SamplingParams(max_tokens=8))
    kv.admit(r)
    r.state, r.num_computed_tokens, r.draft_token_ids = state, prompt_len, list(drafts)
    r.admit_order = r.request_id
    assert kv.grow(r, prompt_len + len(drafts) + 1)
    return r


def test_offload_then_restore_keeps_state_and_conserves_pages():
    kv = KVManager(BlockAllocator(8, 4), max_num_seqs=2, num_host_blocks=8)
    r = _running(kv, 9, drafts=[5, 6])  # 9 verified + 2 drafts = 11 positions of KV to keep: 3 pages
    table, slot = list(r.block_table), r.pillar_slot
    plan = StepPlan(1)
    assert kv.evict(r, plan, step=1)
    (op,) = plan.swap_out
    assert op.device_blocks == tuple(table[:3]) and op.pillar_slot == slot and len(op.host_blocks) == 3
    assert r.state is RequestState.SWAPPED and r.swapped_state is RequestState.DRAFT and r.draft_token_ids == [5, 6]
    assert not r.block_table and r.pillar_slot == -1 and kv.allocator.num_free == 8 and kv.host.num_free == 5
    plan = StepPlan(2)
    assert kv.restore(plan, running=[]) == [r]
    (op,) = plan.swap_in
    assert list(op.device_blocks) == r.block_table and r.state is RequestState.DRAFT and kv.host.num_free == 8
    assert (kv.num_swap_outs, kv.num_swap_ins, kv.num_recomputes) == (1, 1, 0) and r.metrics.num_offloads == 1
    kv.release(r)
    assert kv.allocator.num_free == 8 and kv.has_free_slot and r.pillar_slot == -1


def test_restore_waits_for_the_running_requests_growth():
    kv = KVManager(BlockAllocator(3, 4), max_num_seqs=3, num_host_blocks=8)
    a = _running(kv, 3, state=RequestState.VERIFY)
    a.draft_token_ids = [1, 2, 3, 4, 5, 6]  # its verify needs 10 positions: 2 pages more than it holds
    b = _running(kv, 3)
    kv.evict(b, StepPlan(1), step=1)
    assert kv.allocator.num_free == 2 and kv.restore(StepPlan(2), running=[a]) == []  # a grows first
    assert kv.restore(StepPlan(3), running=[]) == [b]


def test_full_host_pool_drops_the_kv_and_counts_a_recompute(caplog):
    kv = KVManager(BlockAllocator(8, 4), max_num_seqs=2, num_host_blocks=1)
    r = _running(kv, 9)
    with caplog.at_level("WARNING", logger="sparsespec.runtime"):
        assert not kv.evict(r, StepPlan(1), step=1)
    assert "host KV pool full" in caplog.text and not r.block_table and r.pillar_slot == -1
    assert (kv.num_recomputes, r.metrics.num_preemptions, r.metrics.offload_fallbacks) == (1, 1, 1)
    assert kv.allocator.num_free == 8 and kv.host.num_free == 1


def test_release_of_a_swapped_request_frees_its_host_pages_and_row():
    kv = KVManager(BlockAllocator(8, 4), max_num_seqs=1, num_host_blocks=4)
    r = _running(kv, 5)
    kv.evict(r, StepPlan(1), step=1)
    assert kv.num_free_host_rows == 0 and kv.host.num_free == 2
    kv.release(r)
    assert kv.num_free_host_rows == 1 and kv.host.num_free == 4 and not kv.swapped and not r.host_blocks
