"""The `convbn` group: the global flags (the Session every command shares), the one error handler, the commands
from training.py, models.py and browse.py, and the executable (`entry`)."""

from __future__ import annotations

import os
import signal
import sys

import click

from ..errors import EXIT_BAD_INPUT, ConvbnError, Stopped, Terminated
from ..files import WRITE_ONLY, tensorflow_write_error, user_path, write_error
from ..signals import install
from . import browse, models, training
from .common import Session


def fail(lines, code):
    for line in [lines] if isinstance(lines, str) else lines:
        click.echo(f"error: {line}", err=True)
    sys.exit(code)


class ConvbnGroup(click.Group):
    """The command group, with the one error handler every command shares. While a command runs, SIGTERM
    raises Terminated (as Ctrl-C raises KeyboardInterrupt), so that every `finally` cleans up and the exit code
    says which signal ended it (130 or 143); training turns both into a checkpoint first (train/events.py)."""

    GLOBAL_FLAGS = ("-q", "--quiet", "--verbose")

    def parse_args(self, ctx, args):
        # `convbn train x.yaml --quiet` means `convbn --quiet train x.yaml`: the global flags work anywhere
        cut = args.index("--") if "--" in args else len(args)
        flags = [a for a in args[:cut] if a in self.GLOBAL_FLAGS]
        rest = [a for a in args[:cut] if a not in self.GLOBAL_FLAGS] + args[cut:]
        return super().parse_args(ctx, flags + rest)

    def invoke(self, ctx):
        def terminate(signum, frame):
            raise Terminated(signum)

        restore = install({signal.SIGTERM: terminate})  # left alone outside the main thread
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("interrupted by SIGINT", err=True)
            sys.exit(130)
        except Stopped as e:  # a signal: not an error (training saved a checkpoint first and says where)
            click.echo(str(e), err=True)
            sys.exit(e.exit_code)
        except ConvbnError as e:
            fail(e.lines, e.exit_code)
        except OSError as e:  # the machine said no: a full disk, a path that cannot be written, ...
            fail(_os_error_line(e), EXIT_BAD_INPUT)
        except Exception as e:  # a TensorFlow write that met a full disk or a read-only place (a last resort)
            written = tensorflow_write_error(e)
            if written is None:
                raise
            fail(written.lines, written.exit_code)
        finally:
            restore()


def _os_error_line(e: OSError) -> str:
    """One line for an OSError: the path as the user knows it (a destination, never convbn's temporary beside it),
    and the machine's words; a full disk or a read-only place is said as every write error says it."""
    if e.filename and e.errno in WRITE_ONLY:
        return write_error(e, e.filename).lines[0]
    where = f"{user_path(e.filename)}: " if e.filename else ""
    return f"{where}{e.strerror or e}"


@click.group(cls=ConvbnGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="convbn")
@click.option("--verbose", is_flag=True, help="Show TensorFlow's own start-up and log output.")
@click.option("-q", "--quiet", is_flag=True, help="Only results and errors: no progress bars, no per-epoch lines.")
@click.pass_context
def main(ctx, verbose, quiet):
    """Train conv nets with per-channel batch normalization on MNIST-like data, and inspect every filter's BN."""
    if verbose and quiet:
        raise click.UsageError("--verbose and --quiet contradict each other")
    ctx.obj = Session(verbose=verbose, quiet=quiet)


for command in (*training.COMMANDS, *models.COMMANDS, *browse.COMMANDS):
    main.add_command(command)


def entry():
    """Run the command line (convbn_cli/__main__.py's entry, the `convbn` executable and `python -m convbn_cli`,
    calls this once its signal handlers are in place): `main`, then, once TensorFlow has been loaded, an exit
    that skips the interpreter's teardown. Tearing down TensorFlow's modules and thread pools held the prompt for
    3-8 s after the last line on 2 cores (0.7 s on a fast one). Nothing is lost by skipping it: every file convbn
    writes is complete when its command returns (atomic writes, closed summary writers, saved checkpoints), and
    the standard streams are flushed here."""
    try:
        main(prog_name="convbn")
        code = 0
    except SystemExit as e:
        code = e.code
    if "tensorflow" not in sys.modules:
        sys.exit(code)
    if not isinstance(code, int):  # sys.exit("message") or sys.exit(None)
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can reach it anyway
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
