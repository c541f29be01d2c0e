"""Graph passes: every attention subgraph of a Dynamo graph becomes one ``sparsespec::attention`` node."""

from .manager import PassManager
from .report import AttentionRecord, RewriteReport

__all__ = ["AttentionRecord", "PassManager", "RewriteReport"]
