"""What a run records about how it was made (run.json): the command line, the overrides, the versions of
convbn, TensorFlow, Keras, NumPy and Python, the CPU and GPUs, and the git commit when convbn runs from a checkout."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path


def provenance(overrides=()) -> dict:
    return {"command": shlex.join(["convbn", *sys.argv[1:]]) if sys.argv and sys.argv[0] else None,
            "overrides": list(overrides),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(), "machine": _machine(), "git_commit": _git_commit()}


def _versions() -> dict:
    import keras
    import numpy
    import tensorflow as tf

    from ..version import __version__

    return {"convbn": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def _machine() -> dict:
    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(),
            "gpus": [d.name for d in tf.config.list_physical_devices("GPU")], "platform": platform.platform()}


def _git_commit() -> str | None:
    """HEAD of the checkout convbn runs from (with "+dirty" for uncommitted changes); None when installed."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (head + ("+dirty" if dirty else "")) or None
