"""``python jobs/benchmark.py trim_switch``: the ``trim`` benchmark on the embedded
SwitchTransformers (``qmoe_ray.bench.trim``, ``--model switch``), recorded in its own section."""

from __future__ import annotations

from qmoe_ray.bench import BenchResult, trim


def add_arguments(parser) -> None:
    trim.add_arguments(parser)
    parser.set_defaults(model="switch")


def run(args) -> BenchResult:
    return trim.run(args)
