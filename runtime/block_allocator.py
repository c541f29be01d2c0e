"""Paged KV block allocator (torch-free, nano-vllm's BlockManager without prefix hashing).

Blocks are page indices into the device pools of ``kv_cache.py``; a request's *block table* is the list of its
pages in logical order, so token position ``p`` lives in page ``table[p // page_size]`` at offset
``p % page_size``. Ref counts exist so pages can later be shared (prefix caching, forked requests); today every
page has one owner. Misuse (double free, freeing a page never handed out) raises ``RuntimeError``: it is a runtime
bug, never a user error, and silently corrupting the free list would corrupt another request's KV.
"""

from __future__ import annotations

from collections import deque


class BlockAllocator:
    """``num_blocks`` pages of ``page_size`` tokens; O(1) allocate and free from a FIFO free list."""

    def __init__(self, num_blocks: int, page_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"BlockAllocator needs num_blocks >= 1, got {num_blocks}")
        if page_size < 1:
            raise ValueError(f"BlockAllocator needs page_size >= 1, got {page_size}")
        self.num_blocks = num_blocks
        self.page_size = page_size
        # FIFO rather than LIFO: a freed page is reused last, which makes use-after-free bugs show up as wrong
        # tokens in tests instead of being masked by the page being rewritten with the same data.
        self._free: deque[int] = deque(range(num_blocks))
        self._ref = [0] * num_blocks

    # ---- queries ------------------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Pages needed to hold ``num_tokens`` tokens (positions ``0 .. num_tokens-1``)."""
        return -(-num_tokens // self.page_size)

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    # ---- mutation -----------------------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """``n`` fresh pages (ref count 1). Raises ``RuntimeError`` if fewer are free: check ``can_allocate``."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise RuntimeError(f"out of KV blocks: asked {n}, {len(self._free)} free of {self.num_blocks}")
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            self._ref[b] = 1
        return out

    def share(self, blocks: list[int]) -> None:
        """One more owner for each of ``blocks`` (already allocated)."""
        for b in blocks:
            if self._ref[b] <= 0:
                raise RuntimeError(f"cannot share block {b}: it is not allocated")
            self._ref[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each of ``blocks``; a page returns to the free list when its count reaches 0."""
        for b in blocks:
            if not (0 <= b < self.num_blocks):
                raise RuntimeError(f"cannot free block {b}: outside 0..{self.num_blocks - 1}")
            if self._ref[b] <= 0:
                raise RuntimeError(f"double free of KV block {b}")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)

    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Append pages to ``table`` (in place) until it holds ``num_tokens`` tokens.

        All-or-nothing: returns ``False`` and leaves ``table`` untouched when not enough pages are free.
        """
        need = self.blocks_for(num_tokens) - len(table)
        if need <= 0:
            return True
        if not self.can_allocate(need):
            return False
        table.extend(self.allocate(need))
        return True
