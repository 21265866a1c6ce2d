"""The ``evalsuite`` command. Subcommands live in their stage's module and are imported only when
called, so ``evalsuite --help`` is instant and lists them all.

Exit codes (``EXIT_CODES``, the constants in ``evalsuite.judge.checks``): see ``--help``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from evalsuite.versions import __version__
from evalsuite.errors import EvalsuiteError, Interrupted, user_error

from evalsuite.judge.checks import EXIT_INCOMPLETE, EXIT_INTERNAL, EXIT_INVALID, EXIT_USAGE

EXIT_CODES = f"""exit codes:
  0    passed: every check that gates passed
  1    a regression: a gated check failed
  {EXIT_USAGE}    a usage or input error (one line on stderr, no traceback)
  {EXIT_INTERNAL}    an internal error (a bug: traceback on stderr, the results so far are kept)
  {EXIT_INCOMPLETE}    INCOMPLETE: the run could not judge everything it was asked to (interrupted, a stage
       or task without records, nothing comparable in the baseline, no gated check judged, a NaN in
       the data a check needs)
  {EXIT_INVALID}    INVALID: the results file contradicts itself; nothing in it is judged
  128+N  ended by signal N (130 Ctrl-C, 143 SIGTERM)"""

# name → (module, help); the module defines add_arguments(parser) and main(args) -> int
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("evalsuite.commands.run", "quantize a model and evaluate fp and quantized variants side by side"),
    "schemes": ("evalsuite.commands.schemes", "list the quantization schemes"),
    "compare": ("evalsuite.commands.compare", "compare two results files metric by metric"),
    "gate": ("evalsuite.commands.gate", "gate a candidate results file against a baseline"),
    "report": ("evalsuite.commands.report", "render a results file as md, html, json or junit"),
    "baseline": ("evalsuite.commands.baseline", "create or update a baseline from a results file"),
    "history": ("evalsuite.commands.history", "show a metric's trend across runs and flag drift"),
    "data": ("evalsuite.commands.data", "fetch the evaluation data from the Hub into a local mirror, or check one"),
    "fix": ("evalsuite.commands.fix", "find and verify a mixed-precision recipe (a format per layer) with which a failing "
            "scheme passes"),
    "nightly": ("evalsuite.commands.nightly", "run a matrix of models x schemes x stages from a config file"),
}


# Import-time log lines of torchao (imported by transformers whenever it is installed) on a torch it
# was not built for: kernels this suite never calls. They would break the one-line error contract.
_IMPORT_NOISE = {"torchao": "Could not load this library", "torch.utils._pytree": "is an Enum subclass"}


def quiet_import_noise() -> None:
    import logging

    for logger, marker in _IMPORT_NOISE.items():
        logging.getLogger(logger).addFilter(lambda record, m=marker: m not in record.getMessage())


class CommaList(argparse.Action):
    """A list option that takes comma lists, repeats, or both: ``--variant a,b`` = ``--variant a --variant b``
    (the one spelling of a list across subcommands)."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        items += [v.strip() for v in str(values).split(",") if v.strip()]
        setattr(namespace, self.dest, items)


def hidden_alias(p: argparse.ArgumentParser, old: str, dest: str, **kwargs) -> None:
    """An old spelling, still accepted for one release, not shown in --help."""
    p.add_argument(old, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage too)
        raise EvalsuiteError(message)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="evalsuite", description="Quantization accuracy and regression suite for causal LMs.",
                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"evalsuite {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EXIT_CODES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from evalsuite.load.model import prefer_expandable_segments

    prefer_expandable_segments()
    quiet_import_noise()
    from evalsuite.commands.nightly import start_entry_watchdog

    start_entry_watchdog()  # only under 'evalsuite nightly': ends this entry if the matrix dies or time runs out
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(command if command in COMMANDS else None)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        module = importlib.import_module(COMMANDS[args.command][0])
        entry = getattr(module, "main", None) or getattr(module, args.command)
        return int(entry(args) or 0)
    except EvalsuiteError as e:
        print(f"evalsuite: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Interrupted as e:
        print(f"evalsuite: interrupted by {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("evalsuite: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug in evalsuite: show it, and keep it apart from 1 (regression) and 2 (usage)
        mapped = user_error(e)  # ...unless it is a library's word for a user's mistake (a full disk)
        if mapped is not None:
            print(f"evalsuite: error: {mapped}", file=sys.stderr)
            return EXIT_USAGE
        import traceback

        traceback.print_exc()
        print("evalsuite: internal error (exit 3); please report it with the traceback above", file=sys.stderr)
        return EXIT_INTERNAL
