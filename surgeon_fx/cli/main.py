"""The ``surgeon-fx`` command: argument parsing, logging, and one-line errors."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from typing import Iterator

import torch

from .. import __version__
from ..errors import SurgeonError
from . import analyze_cmd, compress_cmd, graph_cmd, plot_cmd, progress
from .models import BUILTIN_MODELS

PROG = "surgeon-fx"


def main(argv: list[str] | None = None) -> int:
    """Run the ``surgeon-fx`` command line with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    Errors a user can fix print one line, ``surgeon-fx: error: ...``, on stderr and
    return 1 (argparse usage errors exit with 2). ``--debug`` shows the traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    progress.set_enabled(not args.quiet)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    with console_logging(args.verbose, args.quiet):
        try:
            return args.run(args)
        except BrokenPipeError:
            # The reader of stdout (such as `head`) exited. Point stdout at /dev/null so that
            # Python's flush at exit does not raise again, as the Python docs on SIGPIPE advise.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        except (SurgeonError, OSError, ValueError, ImportError) as err:
            if args.debug:
                raise
            print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    output = common.add_argument_group("common options")
    output.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more: -v for steps and timings, -vv for debug messages")
    output.add_argument("-q", "--quiet", action="store_true", help="hide progress bars, warnings and log messages")
    output.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    output.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for torch (default: torch's choice, one per core); 1 is "
                        "often fastest on a machine that other processes keep busy")

    builtins = "\n".join(f"  {name:<11} {description}" for name, (description, _) in BUILTIN_MODELS.items())
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Compress transformer models by rewriting their torch.fx graphs.",
        epilog=f"MODEL is a local Hugging Face model folder or one of these built-in names:\n{builtins}\n\n"
        f"Run '{PROG} COMMAND --help' for the options of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    analyze_cmd.add_parser(subparsers, common)
    compress_cmd.add_parser(subparsers, common)
    plot_cmd.add_parser(subparsers, common)
    graph_cmd.add_parser(subparsers, common)
    _add_demo_parser(subparsers, common)
    return parser


@contextlib.contextmanager
def console_logging(verbose: int, quiet: bool) -> Iterator[None]:
    """Print surgeon_fx's log records and warnings on stderr at the level the flags set.

    The default shows warnings (such as ``SurgeonWarning``), ``-v`` adds info and
    ``-vv`` debug messages, and ``--quiet`` shows errors only. Everything is put back
    on exit, so that calling :func:`main` in a program or test leaves its logging as it was.
    """
    if quiet:
        level = logging.ERROR
    else:
        level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    handler.setLevel(level)
    loggers = [logging.getLogger("surgeon_fx"), logging.getLogger("py.warnings")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(level)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if quiet else "default")
        # Deprecation notices from torch and transformers are not the user's to act on.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        logging.captureWarnings(True)
        try:
            yield
        finally:
            logging.captureWarnings(False)
            for lg, previous in zip(loggers, levels):
                lg.removeHandler(handler)
                lg.setLevel(previous)


def _add_demo_parser(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "demo", parents=[common], help="run the MiniLM demo (what 'make demo' runs)",
        description="Decompose every attention and MLP linear of all-MiniLM-L6-v2, print the "
        "analysis, the rewrites, sentence-embedding fidelity and latency, then restore the "
        "model and check that it is bit-exact.",
    )
    parser.add_argument("--sentences", type=int, default=256, metavar="N",
                        help="number of evaluation sentences (default 256)")
    parser.add_argument("--keep", type=float, default=0.5, metavar="F",
                        help="fraction of each linear layer's weights to keep, in (0, 1] (default 0.5)")
    parser.add_argument("--repeats", type=int, default=5, metavar="N",
                        help="timed repetitions for the latency median (default 5)")
    parser.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from ..demo import main as demo_main

    return demo_main(["--sentences", str(args.sentences), "--keep", str(args.keep), "--repeats", str(args.repeats)])


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = " ".join(lines) if lines else type(err).__name__
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return text
