"""The configs that ship inside the package (convbn_cli/configs/*.yaml): `convbn train mnist_bn` works from any
directory, and `convbn configs` lists them (no TensorFlow)."""

from __future__ import annotations

from pathlib import Path

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "configs"


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def builtin_path(name: str) -> Path | None:
    """The shipped config called `name` (with or without .yaml), or None."""
    stem = name[:-5] if name.endswith(".yaml") else name
    path = BUILTIN_DIR / f"{stem}.yaml"
    return path if "/" not in name and stem in builtin_names() else None


def resolve(path) -> Path:
    """A config argument as a file: the path itself when it exists, else a built-in config of that name."""
    path = Path(path)
    if path.exists():
        return path
    return builtin_path(str(path)) or path
