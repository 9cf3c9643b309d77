"""Run a benchmark and record it in BENCHMARKS.md: ``python jobs/benchmark.py NAME [options]``.

NAME is a module of ``qmoe_ray.bench`` (``gptq``, ``codec``, ...); ``--list`` shows them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys

import qmoe_ray.bench as bench
from qmoe_ray.errors import InputError


def available() -> list[str]:
    """Names of the benchmark modules."""
    return sorted(
        m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_")
    )


def main(argv: list[str] | None = None) -> int:
    names = available()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", nargs="?", choices=names, help="which benchmark")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md")
    parser.add_argument("--out", default="BENCHMARKS.md", help="markdown file to update")
    args, rest = parser.parse_known_args(argv)
    if args.list or not args.name:
        print("\n".join(names))
        return 0
    mod = importlib.import_module(f"qmoe_ray.bench.{args.name}")
    sub = argparse.ArgumentParser(prog=f"benchmark.py {args.name}")
    mod.add_arguments(sub)
    try:
        result = mod.run(sub.parse_args(rest))
    except InputError as exc:  # bad options: the message names them and the fix
        print(f"benchmark.py {args.name}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.figures, indent=2, default=str))
    print(result.markdown)
    if not args.no_record:
        bench.record(args.name, result, args.out)
        print(f"recorded in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
