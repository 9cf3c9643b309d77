"""The ``qmoe-ray`` command line: ``qmoe-ray {compress,eval,...} ...``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``main(args) -> int``;
modules keep their heavy imports (Ray, torch) inside ``main`` so that building the parser is cheap.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "compress": ("qmoe_ray.distributed.job", "compress an MoE checkpoint (a Ray job)"),
    "eval": ("qmoe_ray.evaluate", "held-out loss and perplexity of a model"),
    "export": ("qmoe_ray.export", "write a plain HF bf16 checkpoint of a compressed model"),
    "inspect": ("qmoe_ray.inspect_cmd", "what is inside a compressed checkpoint"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per command."""
    parser = argparse.ArgumentParser(prog="qmoe-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qmoe-ray`` console script."""
    args = build_parser().parse_args(argv)
    return int(importlib.import_module(args._module).main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
