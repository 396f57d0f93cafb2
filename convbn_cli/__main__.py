"""`python -m convbn_cli`: the same as the `convbn` command."""

from .cli import entry

entry()
