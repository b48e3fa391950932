"""surgeon_fx: compress transformer models by rewriting their torch.fx graphs.

Entry points: :func:`capture`, :func:`analyze`, :func:`compress`, :func:`restore`.
"""

from .analysis import Analysis, AttentionOp, LinearSite, analyze
from .api import compress, restore
from .capture import capture
from .errors import (
    AnalysisError,
    CaptureError,
    PlanError,
    RestoreError,
    RewriteError,
    SurgeonError,
    SurgeonWarning,
)
from .layers import LinearLRD
from .plan import Keep, LRDRule, Plan, Selector

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "AnalysisError",
    "AttentionOp",
    "CaptureError",
    "Keep",
    "LRDRule",
    "LinearLRD",
    "LinearSite",
    "Plan",
    "PlanError",
    "RestoreError",
    "RewriteError",
    "Selector",
    "SurgeonError",
    "SurgeonWarning",
    "analyze",
    "capture",
    "compress",
    "restore",
]
