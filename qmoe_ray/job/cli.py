"""``qmoe-ray compress`` / ``jobs/compress.py``: parse options into a ``CompressConfig`` and run.

Every field of ``CompressConfig`` is a flag (``--group-size``), and ``--config FILE.yaml`` supplies
any of them as keys (flags given on the command line win). Storage options (endpoints, profiles)
come from ``--storage-option KEY=VALUE`` (the source and the output alike; ``qmoe_ray.cli``),
``--source-option`` / ``--output-option KEY=VALUE`` (one side only, over ``--storage-option``) or
the usual environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ...); they are never
written or logged.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Any

from qmoe_ray.cli import add_storage_options, parse_storage_options, storage_options
from qmoe_ray.errors import InputError
from qmoe_ray.job.config import CompressConfig, StorageOptions

_HELP = {
    "source": "model URL or path (HF layout), or 'embedded' for the packaged tiny MoE",
    "output": "where to write the compressed checkpoint (path, file://, s3://, gs://)",
    "data": "calibration data: .npy/.safetensors token ids, .jsonl/.txt text, or 'embedded'",
    "scheme": "ternary, ternary-sym256 (GGUF TQ2_0/TQ1_0-exact), int2, int3, int4 or int8",
    "method": "gptq, or rtn (round to nearest, the baseline)",
    "group_size": "experts quantized jointly per worker call, or auto: per layer the largest "
                  "group whose predicted worker peak (+10%%) fits --worker-memory",
    "token_cap": "Hessian tokens per expert capped at this x the mean (0: no cap)",
    "percdamp": "GPTQ damping, fraction of the mean Hessian diagonal",
    "blocksize": "GPTQ block size",
    "actorder": "GPTQ act-order, columns by descending Hessian diagonal (default: on; "
                "--no-actorder: the QMoE reference's order)",
    "sequential_experts": "quantize wo/down on the outputs of the quantized wi/gate/up "
                          "(--no-sequential-experts: the QMoE reference recipe)",
    "quant_group_size": "int schemes: scale groups along the input dimension",
    "hessian_dtype": "dtype of the Hessians' running sums: float32 (half the memory, the same "
                     "Hessians: the products are float32 either way) or float64",
    "rate_lambda": "rate-aware GPTQ rounding: near-threshold weights become cheap zeros when "
                   "their loss (in grid steps squared) is below this x the bits saved (0: off)",
    "target_bits": "size budget in bits per expert parameter (coded bytes with scales and "
                   "tables, as inspect counts): each matrix gets the candidate setting "
                   "(ternary at several rate-aware lambdas, int2, int3, int4) that minimises "
                   "the loss estimate under it",
    "prune": "prune the experts: magnitude, wanda or sparsegpt (with --sparsity or "
             "--prune-pattern; kept zero through the GPTQ sweep)",
    "sparsity": "unstructured pruning: fraction of each expert row zeroed, in [0, 1)",
    "prune_pattern": "N:M pruning, e.g. 2:4: N of every M consecutive input weights zeroed",
    "trim_plan": "compress the model trimmed by this plan (qmoe-ray analyze; docs/TRIM.md)",
    "drop_experts": "trim: drop the N least-routed experts (N, across MoE layers, or N/layer); "
                    "the job scores the source on its calibration data first",
    "drop_layers": "trim: drop the N MoE layers that change the residual stream least",
    "drop_blocks": "trim: drop the N blocks whose output is most like their input",
    "segment_symbols": "symbols per rANS segment: smaller = more decode parallelism (GPU resident "
                       "mode), larger = smaller files",
    "drop_mtp": "leave the multi-token-prediction layers out of the output (default: carried "
                "through unchanged, bf16, unquantized)",
    "num_samples": "calibration samples",
    "seq_len": "tokens per sample",
    "eval_samples": "held-out samples for the report's loss (0: none)",
    "batch_size": "samples per forward batch",
    "num_workers": "quantization worker actors",
    "num_stores": "activation store actors",
    "cpus_per_worker": "CPUs per worker (and its torch threads)",
    "gpus_per_worker": "GPUs per worker (0: CPU quantization)",
    "worker_memory": "GiB per worker that --group-size auto sizes the groups to (default: the "
                     "machine's available memory over the workers, locally; Ray's memory "
                     "resource of a worker's node over its workers, on a cluster; GPU workers: "
                     "give the GPU's); with a fixed --group-size, a group that does not fit is "
                     "refused",
    "address": "Ray address (default: RAY_ADDRESS, else an in-process local cluster)",
    "seed": "data sampling seed",
    "overwrite": "replace an existing checkpoint at the output",
}


def _int_or_str(value: str) -> int | str:
    """``--group-size 8`` or ``--group-size auto`` (checked by ``CompressConfig``)."""
    return int(value) if value.strip().lstrip("-").isdigit() else value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every ``CompressConfig`` field, plus --config and storage options."""
    parser.add_argument("--config", help="YAML file whose keys are the options below")
    for f in dataclasses.fields(CompressConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=_HELP.get(f.name))
            continue
        kind = {"int": int, "float": float, "int | None": int, "float | None": float,
                "str | None": str, "int | str": _int_or_str}.get(str(f.type), str)
        parser.add_argument(flag, type=kind, default=None, help=f"{_HELP.get(f.name, '')} "
                            f"(default: {f.default})")
    add_storage_options(parser, "the source and the output")
    parser.add_argument("--source-option", action="append", default=[], metavar="KEY=VALUE",
                        help="as --storage-option, for the source only (wins over it)")
    parser.add_argument("--output-option", action="append", default=[], metavar="KEY=VALUE",
                        help="as --storage-option, for the output only (wins over it)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> tuple[CompressConfig, StorageOptions]:
    """Merge the YAML file (if any) and the flags into a validated config."""
    values: dict[str, Any] = {}
    if args.config:
        import yaml

        try:
            with open(args.config, encoding="utf-8") as fh:
                loaded = yaml.safe_load(fh) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise InputError(f"--config {args.config}: not a YAML file "
                             f"({type(exc).__name__}); write one option: value per line") from None
        if not isinstance(loaded, dict):
            raise InputError(f"--config {args.config}: expected a mapping of option: value")
        values.update(loaded)
    for f in dataclasses.fields(CompressConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    cfg = CompressConfig.from_mapping(values)
    shared = storage_options(args)
    storage = StorageOptions(
        {**shared, **parse_storage_options(args.source_option, "--source-option")},
        {**shared, **parse_storage_options(args.output_option, "--output-option")})
    return cfg, storage


def _console_logging() -> None:
    """The job's own messages (``qmoe_ray`` logger) on stderr; other libraries' INFO chatter
    (matplotlib's font cache, Ray's start-up notices) stays out of a user's console."""
    logger = logging.getLogger("qmoe_ray")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("[qmoe-ray] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


class _Stderr(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is at each message (not the one at creation: the
    CLI may run several times in one process, under redirections)."""

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it
        pass


def main(args: argparse.Namespace) -> int:
    """Run the job; prints where the report is."""
    from qmoe_ray.job.driver import run_compression

    _console_logging()
    cfg, storage = config_from_args(args)  # bad options: qmoe_ray.cli.run says so, exit 2
    report = run_compression(cfg, storage, progress=not args.quiet)
    s = report["sizes"]
    out = cfg.output.rstrip("/")
    print(f"[qmoe-ray] wrote {out}: experts {s['expert_bits_per_param']:.3f} bits/param, "
          f"whole model {s['bits_per_param']:.3f} bits/param ({s['ratio_vs_bf16']:.2f}x vs bf16)")
    if report.get("heldout_loss") is not None:
        print(f"[qmoe-ray] held-out loss of the compressed model: {report['heldout_loss']:.4f}")
    print(f"[qmoe-ray] report: {out}/report.md (also report.json, report.png)")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """Standalone entry (``python jobs/compress.py ...``)."""
    parser = argparse.ArgumentParser(prog="compress", description=__doc__.splitlines()[0])
    add_arguments(parser)
    from qmoe_ray.cli import run

    return run("compress", main, parser.parse_args(argv))
