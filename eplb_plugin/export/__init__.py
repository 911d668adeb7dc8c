"""Offline export of a checkpoint into a balanced per-rank layout, its verification, and
the reader that engines use to load one rank of an export.

An export folder holds

- ``experts-rank{r:05d}-{i:05d}-of-{n:05d}.safetensors``: the expert tensors of rank ``r``'s
  physical slots, replicas duplicated, named like the source but with the *global slot id*
  in place of the expert id (``model.layers.3.mlp.experts.{slot}.gate_proj.weight``; fused
  sources keep their name and hold the rank's slots along dim 0);
- ``shared-{i:05d}-of-{n:05d}.safetensors``: every other tensor once, original names;
- ``layout.safetensors`` (:meth:`ExpertLayout.save`) and ``expert_location.json`` (SGLang's
  ``--init-expert-location`` form, one row per hidden layer);
- ``eplb_export.json``: the index, listing every tensor with its file, rank, layer, slots,
  logical experts and source tensor/file;
- the checkpoint's small side files (``config.json``, tokenizer files, ...), unchanged.

Writing streams byte ranges (never more than one copy chunk, or one tensor with
``copy_mode="safe_open"``, resident), into a hidden temporary folder beside the target
that is fsynced and renamed into place only when complete.
"""

from .plan import (
    COPY_MODES,
    EXPORT_FORMAT,
    EXPORT_INDEX,
    EXPORT_VERSION,
    LAYOUT_FILE,
    SGLANG_LAYOUT_FILE,
    ExportConfig,
    ExportPlan,
    OutFile,
    OutTensor,
    export_index,
    match_layers,
    plan_export,
)
from .read import ExportedCheckpoint, open_export
from .verify import VerifyReport, verify_export
from .write import ExportSummary, check_output_dir, export_checkpoint, safetensors_header

__all__ = [
    "COPY_MODES",
    "EXPORT_FORMAT",
    "EXPORT_INDEX",
    "EXPORT_VERSION",
    "LAYOUT_FILE",
    "SGLANG_LAYOUT_FILE",
    "ExportConfig",
    "ExportPlan",
    "ExportSummary",
    "ExportedCheckpoint",
    "OutFile",
    "OutTensor",
    "VerifyReport",
    "check_output_dir",
    "export_checkpoint",
    "export_index",
    "match_layers",
    "open_export",
    "plan_export",
    "safetensors_header",
    "verify_export",
]
