"""Hugging Face transformers integration: expert-parallel MoE models with EPLB.

Import the real ``transformers`` package only inside functions: this sub-package is installed
as ``eplb_plugin.integrations.transformers`` and must never be imported as ``transformers``.
"""

from .models import FAMILIES, MoEFamily, check_checkpoint, family_of, supported_families
from .patch import EplbModel, apply_eplb

__all__ = [
    "FAMILIES",
    "EplbModel",
    "MoEFamily",
    "apply_eplb",
    "check_checkpoint",
    "family_of",
    "supported_families",
]
