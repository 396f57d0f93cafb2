"""convbn's version, in a module of its own so that any layer can read it (the package's __init__ is the top)."""

__version__ = "0.1.0"
