"""onnxprune: structured pruning of ONNX models with Subspace Node Pruning (SNP)."""

__version__ = "0.1.0"

from .api import PruneResult, prune  # noqa: E402
from .errors import CalibrationError, ModelError, OnnxPruneError, ResourceError, TargetError  # noqa: E402
from .inspect import InspectReport, inspect_model  # noqa: E402

__all__ = ["prune", "PruneResult", "inspect_model", "InspectReport", "OnnxPruneError", "ModelError", "CalibrationError", "TargetError", "ResourceError", "__version__"]
