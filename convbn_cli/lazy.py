"""Names a package imports on first use (PEP 562), so that `convbn --help` and `convbn validate` never pay for
TensorFlow. A lazy name must not equal a submodule's name: importing the submodule would replace it."""

import importlib


def lazy_names(package: str, names: dict):
    """A module `__getattr__` for `package` that imports `names[name]` (a submodule) when `name` is first used."""

    def __getattr__(name):
        if name in names:
            return getattr(importlib.import_module(f"{package}.{names[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
