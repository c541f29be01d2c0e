"""RewriteReport: what the passes rewrote, what they left alone, and why — one row per attention node."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AttentionRecord:
    """One attention-like subgraph the passes looked at."""

    node: str  # name of the node that produced the attention output in the original graph
    form: str  # "sdpa" | "eager" | "softmax" (an unmatched softmax that may be attention)
    rewritten: bool
    layer_idx: int | None = None
    layer_idx_source: str = ""  # "parameter name" | "graph order"
    q_heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    gqa: str = ""  # "none" | "repeat_kv removed" | "enable_gqa"
    scale: float | None = None
    mask: str = ""  # "causal flag" | "mask tensor" | "none"
    softcap: float = 0.0
    reason: str = ""  # why a candidate was left alone


@dataclass
class RewriteReport:
    records: list[AttentionRecord] = field(default_factory=list)
    passes: list[tuple[str, int]] = field(default_factory=list)  # (pass name, matched count)
    removed_nodes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def rewritten(self) -> list[AttentionRecord]:
        return [r for r in self.records if r.rewritten]

    @property
    def left_alone(self) -> list[AttentionRecord]:
        return [r for r in self.records if not r.rewritten]

    @property
    def num_rewritten(self) -> int:
        return len(self.rewritten)

    def merge(self, other: RewriteReport) -> None:
        """Fold the report of another graph (Dynamo compiles one graph per graph break) into this one."""
        self.records += other.records
        self.passes += other.passes
        self.removed_nodes += other.removed_nodes
        self.notes += other.notes

    def __str__(self) -> str:
        head = ("layer", "form", "status", "q/kv heads", "head dim", "GQA", "scale", "mask", "softcap", "node")
        rows = [head]
        for r in sorted(self.records, key=lambda r: (r.layer_idx is None, r.layer_idx or 0, r.node)):
            rows.append(
                (
                    "-" if r.layer_idx is None else str(r.layer_idx),
                    r.form,
                    "rewritten" if r.rewritten else f"LEFT ALONE: {r.reason}",
                    f"{r.q_heads}/{r.kv_heads}" if r.q_heads else "-",
                    str(r.head_dim or "-"),
                    r.gqa or "-",
                    "-" if r.scale is None else f"{r.scale:.6g}",
                    r.mask or "-",
                    f"{r.softcap:g}" if r.softcap else "-",
                    r.node,
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        total = len(self.records)
        summary = f"sparsespec rewrite: {self.num_rewritten}/{total} attention nodes rewritten to sparsespec::attention"
        if self.removed_nodes:
            summary += f"; {self.removed_nodes} dead nodes (masks, repeat_kv) removed"
        passes = ", ".join(f"{n}={c}" for n, c in self.passes)
        out = [summary, f"passes: {passes}" if passes else "", *lines, *(f"note: {n}" for n in self.notes)]
        return "\n".join(line for line in out if line)
