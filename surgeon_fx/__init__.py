"""surgeon_fx: compress transformer models by rewriting their torch.fx graphs.

Entry points: :func:`capture`, :func:`analyze`, :func:`compress`, :func:`restore`,
and :func:`backend` for ``torch.compile``. For a live model: :func:`compress_model`,
:func:`restore_model`, :func:`save` and :func:`load`, and the transformer-surgeon style
:class:`CompressionConfig` with :class:`CompressionSchemesManager`.
"""

from .analysis import Analysis, AttentionOp, LinearSite, analyze
from .api import compress, restore
from .backend import CompressionBackend, backend
from .capture import capture
from .config import CompressionConfig
from .errors import (
    AnalysisError,
    CaptureError,
    CheckpointError,
    PlanError,
    RestoreError,
    RewriteError,
    SurgeonError,
    SurgeonWarning,
)
from .layers import LinearLRD
from .live import MaskedLinear, compress_model, restore_model
from .persist import load, save
from .plan import Keep, LRDRule, Plan, PruneRule, Selector
from .schemes import CompressionSchemesManager, Scheme, Schemes

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "AnalysisError",
    "AttentionOp",
    "CaptureError",
    "CheckpointError",
    "CompressionConfig",
    "CompressionSchemesManager",
    "CompressionBackend",
    "Keep",
    "LRDRule",
    "LinearLRD",
    "LinearSite",
    "MaskedLinear",
    "Plan",
    "PlanError",
    "PruneRule",
    "RestoreError",
    "RewriteError",
    "Scheme",
    "Schemes",
    "Selector",
    "SurgeonError",
    "SurgeonWarning",
    "analyze",
    "backend",
    "capture",
    "compress",
    "compress_model",
    "load",
    "restore",
    "restore_model",
    "save",
]
