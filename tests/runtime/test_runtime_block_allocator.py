"""BlockAllocator: a Hypothesis state machine (pages conserved, ref counts exact, double free caught)."""

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from sparsespec_compile.runtime.block_allocator import BlockAllocator


def test_blocks_for_and_grow_all_or_nothing():
    a = BlockAllocator(4, page_size=3)
    assert [a.blocks_for(n) for n in (0, 1, 3, 4, 12)] == [0, 1, 1, 2, 4]
    t: list[int] = []
    assert a.grow(t, 7) and len(t) == 3 and a.num_free == 1
    assert not a.grow(t, 13) and len(t) == 3 and a.num_free == 1  # needs 2 more: nothing taken
    assert a.grow(t, 12) and a.num_free == 0 and not a.can_allocate(1)
    a.free(t)
    assert a.num_free == 4


def test_misuse_raises():
    a = BlockAllocator(2, page_size=1)
    b = a.allocate(1)
    a.free(b)
    with pytest.raises(RuntimeError, match="double free"):
        a.free(b)
    with pytest.raises(RuntimeError, match="outside"):
        a.free([7])
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        a.allocate(3)
    with pytest.raises(ValueError):
        BlockAllocator(0, 4)


class AllocatorMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(1, 24), page=st.integers(1, 5))
    def init(self, num_blocks, page):
        self.a = BlockAllocator(num_blocks, page)
        self.owners: dict[int, list[int]] = {}  # owner -> its block table
        self.next = 0

    @rule(tokens=st.integers(0, 40))
    def new_owner(self, tokens):
        t: list[int] = []
        need = self.a.blocks_for(tokens)
        ok = self.a.grow(t, tokens)
        assert ok == (need <= self.a.num_free + len(t))
        if ok:
            self.owners[self.next] = t
            self.next += 1

    @precondition(lambda self: self.owners)
    @rule(data=st.data(), extra=st.integers(0, 20))
    def grow(self, data, extra):
        o = data.draw(st.sampled_from(sorted(self.owners)))
        t = self.owners[o]
        before = list(t)
        if not self.a.grow(t, len(t) * self.a.page_size + extra):
            assert t == before

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def share(self, data):
        o = data.draw(st.sampled_from(sorted(self.owners)))
        self.a.share(self.owners[o])
        self.owners[self.next] = list(self.owners[o])
        self.next += 1

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def free(self, data):
        o = data.draw(st.sampled_from(sorted(self.owners)))
        self.a.free(self.owners.pop(o))

    @precondition(lambda self: any(self.a.ref_count(b) == 0 for b in range(self.a.num_blocks)))
    @rule(data=st.data())
    def double_free_is_caught(self, data):
        b = data.draw(st.sampled_from([b for b in range(self.a.num_blocks) if self.a.ref_count(b) == 0]))
        with pytest.raises(RuntimeError):
            self.a.free([b])

    @invariant()
    def conserved(self):
        if not hasattr(self, "a"):
            return
        refs: dict[int, int] = {}
        for t in self.owners.values():
            assert len(set(t)) == len(t)  # no page twice in one table
            for b in t:
                refs[b] = refs.get(b, 0) + 1
        for b in range(self.a.num_blocks):
            assert self.a.ref_count(b) == refs.get(b, 0)
        assert self.a.num_free + len(refs) == self.a.num_blocks
        assert set(self.a._free).isdisjoint(refs) and len(set(self.a._free)) == self.a.num_free


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
