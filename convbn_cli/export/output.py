"""Where an export may be written: formats/output.py's checks (shared with recalibrate's ONNX output)."""

from __future__ import annotations

from ..formats.output import check_output

__all__ = ["check_output"]
