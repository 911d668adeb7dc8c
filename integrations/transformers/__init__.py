"""Hugging Face transformers integration: expert-parallel MoE models with EPLB.

Import the real ``transformers`` package only inside functions: this sub-package is installed
as ``eplb_plugin.integrations.transformers`` and must never be imported as ``transformers``.
"""

from .loading import ExportShard, check_checkpoint, check_export, is_export, load_export_model
from .models import FAMILIES, MoEFamily, family_of, supported_families
from .patch import EplbModel, apply_eplb

__all__ = [
    "FAMILIES",
    "EplbModel",
    "ExportShard",
    "MoEFamily",
    "apply_eplb",
    "check_checkpoint",
    "check_export",
    "family_of",
    "is_export",
    "load_export_model",
    "supported_families",
]
