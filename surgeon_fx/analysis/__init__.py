"""Analysis: find linear sites and give each a role from the graph's structure."""

from .attention import AttentionOp
from .core import Analysis, analyze
from .linear_sites import ATTENTION_ROLES, MLP_ROLES, ROLES, LinearSite, find_linear_sites

__all__ = [
    "ATTENTION_ROLES",
    "MLP_ROLES",
    "ROLES",
    "Analysis",
    "AttentionOp",
    "LinearSite",
    "analyze",
    "find_linear_sites",
]
