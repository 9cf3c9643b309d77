"""The ``qmoe-ray`` command line: ``qmoe-ray {compress,eval,...} ...``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``main(args) -> int``;
modules keep their heavy imports (Ray, torch) inside ``main`` so that building the parser is cheap.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from qmoe_ray.errors import USER_ERRORS, InputError, one_line

STORAGE_OPTION = "--storage-option"

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "compress": ("qmoe_ray.job.cli", "compress an MoE checkpoint (a Ray job)"),
    "analyze": ("qmoe_ray.read.analyze", "score experts, MoE layers and blocks; write a trim "
                "plan"),
    "eval": ("qmoe_ray.read.evaluate", "held-out loss and perplexity of a model"),
    "export": ("qmoe_ray.read.export", "write a plain HF bf16 checkpoint of a compressed model"),
    "inspect": ("qmoe_ray.read.inspect", "what is inside a compressed checkpoint"),
    "plan": ("qmoe_ray.job.estimate", "parameters, sizes and job memory of a model, from its "
             "config.json alone"),
}


def add_storage_options(parser: argparse.ArgumentParser, where: str = "every URL") -> None:
    """``--storage-option KEY=VALUE`` (repeatable): fsspec options (an endpoint, a profile,
    ``anon``) for ``where``; the same spelling for every command."""
    parser.add_argument(STORAGE_OPTION, action="append", default=[], metavar="KEY=VALUE",
                        dest="storage_option",
                        help=f"fsspec storage option for {where}, repeatable; VALUE is read as "
                             "JSON when it is JSON (true, 3, {...}), else as a string")


def parse_storage_options(pairs: Sequence[str], flag: str = STORAGE_OPTION) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as a dict (a VALUE that parses as JSON is that JSON value).

    Raises:
        InputError: a pair without ``=`` or without a key (naming ``flag``).
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"{flag} {pair!r}: expected KEY=VALUE, e.g. "
                             "endpoint_url=http://...")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def storage_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--storage-option`` values of parsed ``args``."""
    return parse_storage_options(getattr(args, "storage_option", None) or [])


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per command."""
    parser = argparse.ArgumentParser(prog="qmoe-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def run(prog: str, command: Callable[[argparse.Namespace], int | None],
        args: argparse.Namespace) -> int:
    """Run one command; a user error (``qmoe_ray.errors.USER_ERRORS``) becomes one line on
    stderr and exit status 2, any other exception keeps its traceback (an internal error).

    Args:
        prog: the command's name in messages (``qmoe-ray compress``).
        command: the command's ``main(args)``.
        args: its parsed arguments.

    Returns:
        The exit status.
    """
    try:
        return int(command(args) or 0)
    except USER_ERRORS as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qmoe-ray`` console script (and ``python -m qmoe_ray``)."""
    args = build_parser().parse_args(argv)
    command = importlib.import_module(args._module).main
    return run(f"qmoe-ray {args.command}", command, args)


if __name__ == "__main__":
    sys.exit(main())
