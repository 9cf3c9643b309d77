"""Configuration of a compression job: one frozen dataclass, validated on construction.

The CLI flags and the YAML config file map one-to-one onto the fields of ``CompressConfig`` (a YAML
key is the field name; dashes are accepted for underscores). Unknown keys are rejected so that a
typo never silently falls back to a default. Storage options (credentials, endpoints) are *not*
part of the config: they never enter the manifest, the report or the logs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qmoe_ray.errors import InputError

SCHEMES = ("ternary", "int2", "int3", "int4", "int8", "ternary-sym256")
METHODS = ("gptq", "rtn")
HESSIAN_DTYPES = ("float32", "float64")
EMBEDDED = "embedded"
#: Options left out of the recorded options (manifest, progress record) at these values: the
#: values every job had before the option existed, so a job recorded then still resumes (with
#: that value given), and a refusal can name what the old record meant.
UNRECORDED = {"hessian_dtype": "float64"}


@dataclass(frozen=True)
class CompressConfig:
    """Everything that decides the output of a compression job.

    Attributes:
        source: model URL or path (HF layout), or ``"embedded"`` for the packaged tiny model.
        output: output URL or path (``s3://``, ``gs://``, ``file://``, a local folder).
        data: calibration data (see ``qmoe_ray.data``), ``"embedded"`` for the packaged set.
        scheme: quantization grid: ternary, ternary-sym256 (symmetric, one f16-exact scale per
            256 input columns: GGUF TQ2_0/TQ1_0 exactly), int2, int3, int4, int8.
        method: ``gptq`` or ``rtn`` (round to nearest, the baseline).
        group_size: experts quantized jointly by one worker call, or ``"auto"``: per MoE
            layer, the largest group whose predicted worker peak (the cost model's, plus a
            margin) fits ``worker_memory`` (``qmoe_ray.job.grouping``); the sizes chosen are
            recorded with the job (a resume groups as the first run did) and in the report.
        token_cap: Hessian tokens per expert capped at ``token_cap`` x the mean (0: no cap).
        percdamp: GPTQ damping as a fraction of the mean Hessian diagonal.
        blocksize: GPTQ block size (columns).
        actorder: GPTQ with columns in descending Hessian-diagonal order (default on: on the
            embedded model it cuts the ternary loss rise by a quarter for ~2% more bits; the
            QMoE reference runs without it).
        sequential_experts: quantize an expert's output matrix on the hidden activation through
            its already-quantized input matrices (False: through the original ones, as the QMoE
            reference does).
        quant_group_size: int schemes only: scale groups along the input dim (None: per row).
        hessian_dtype: dtype of the Hessians' running sums on the workers, ``float32`` (default)
            or ``float64``: the products are float32 either way, and the job forms each
            expert's Hessian with one product of its tokens, so float32 sums give the same
            Hessians at half the memory (float64: the sums of before this option; see
            ``qmoe_ray.quant.hessian``).
        rate_lambda: rate-aware rounding (GPTQ only): each weight goes to the grid point that
            minimises its loss increase plus ``rate_lambda`` x one grid step's loss x its code
            length in bits, so near-threshold weights become cheap zeros (0: plain GPTQ; 0.05
            cut ternary bits by a third for +3% proxy loss on switch-base-sized experts).
        target_bits: a size budget in bits per expert parameter (the coded bytes of the experts,
            scales and tables included: the figure ``inspect`` prints). Each expert matrix gets
            one of the allocation's candidate settings (``qmoe_ray.quant.alloc``: ternary at a
            few rate-aware lambdas, int2, int3, int4), chosen to minimise the summed loss
            estimate under the budget (None: one ``scheme`` for every matrix).
        prune: expert pruning before/with the quantization (``qmoe_ray.quant.prune``):
            ``magnitude``, ``wanda`` or ``sparsegpt`` (None: no pruning). Needs ``sparsity`` or
            ``prune_pattern``; the pruned weights are exact zeros of the grid, kept at zero
            through the GPTQ sweep, whose error feedback compensates them.
        sparsity: unstructured pruning: the fraction of each expert matrix row zeroed, in [0, 1).
        prune_pattern: N:M pruning (``"2:4"``, ``"4:8"``): N of every M consecutive input
            weights of each row zeroed (1 <= N < M).
        trim_plan: a trim plan file or URL (``qmoe-ray analyze``; docs/TRIM.md): the job
            compresses the trimmed model (dropped blocks, MoE layers and experts skipped, the
            kept ones calibrated on the trimmed model's stream).
        drop_experts, drop_layers, drop_blocks: trim budgets as ``qmoe-ray analyze`` takes them
            (``N`` or ``N/layer`` experts, MoE layers, blocks): the job scores the source on its
            calibration samples first and trims by the plan they give (not with ``trim_plan``).
        segment_symbols: symbols per rANS segment of an encoded matrix (ternary/int2): the unit
            of decode parallelism (one GPU thread or CPU loop each) against a few bytes of
            overhead per segment; 4096 costs +0.6% over the entropy at P(0)=0.885, 1024 +1.6%.
            Smaller segments make the GPU's resident (fused) product more parallel.
        drop_mtp: leave the source's multi-token-prediction layers (DeepSeek-V3's
            ``model.layers.61``, GLM's last layer: outside the main stack, unused by generation
            here) out of the output (False: carry them through unchanged, bf16, unquantized).
        num_samples: calibration samples.
        seq_len: tokens per calibration sample.
        eval_samples: held-out samples carried through the compressed layers for the report's loss.
        batch_size: samples per forward batch.
        num_workers: quantization worker actors.
        num_stores: activation store actors.
        cpus_per_worker: CPUs reserved by each worker (also its torch thread count).
        worker_memory: memory per worker in GiB for ``group_size="auto"`` (None: this machine's
            available memory over the workers on the local cluster, Ray's memory resource of a
            worker's node over its workers on a joined one; GPU workers: needed, the GPU's).
            With a fixed ``group_size``, a group that does not fit it is refused.
        gpus_per_worker: GPUs reserved by each worker (0: quantize on CPU).
        address: Ray address; None starts an in-process single-node cluster.
        seed: seed for data sampling.
        overwrite: replace an existing checkpoint at ``output``.
    """

    source: str = EMBEDDED
    output: str = "qmoe-out"
    data: str = EMBEDDED
    scheme: str = "ternary"
    method: str = "gptq"
    group_size: int | str = 16
    token_cap: float = 4.0
    percdamp: float = 0.1
    blocksize: int = 128
    actorder: bool = True
    sequential_experts: bool = True
    quant_group_size: int | None = None
    hessian_dtype: str = "float32"
    rate_lambda: float = 0.0
    target_bits: float | None = None
    prune: str | None = None
    sparsity: float | None = None
    prune_pattern: str | None = None
    trim_plan: str | None = None
    drop_experts: str | None = None
    drop_layers: int = 0
    drop_blocks: int = 0
    segment_symbols: int = 4096
    drop_mtp: bool = False
    num_samples: int = 256
    seq_len: int = 128
    eval_samples: int = 64
    batch_size: int = 32
    num_workers: int = 1
    num_stores: int = 1
    cpus_per_worker: float = 1.0
    worker_memory: float | None = None
    gpus_per_worker: float = 0.0
    address: str | None = None
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, expected: str) -> InputError:
            flag = "--" + name.replace("_", "-")
            return InputError(f"{name}={value!r}: expected {expected} ({flag} / config key "
                              f"{name})")

        if self.scheme not in SCHEMES:
            raise bad("scheme", self.scheme, f"one of {', '.join(SCHEMES)}")
        if self.method not in METHODS:
            raise bad("method", self.method, f"one of {', '.join(METHODS)}")
        if self.hessian_dtype not in HESSIAN_DTYPES:
            raise bad("hessian_dtype", self.hessian_dtype, f"one of {', '.join(HESSIAN_DTYPES)}")
        if isinstance(self.group_size, str) and self.group_size.strip().isdigit():
            object.__setattr__(self, "group_size", int(self.group_size))  # YAML/CLI "8"
        if self.group_size != "auto":
            if (not isinstance(self.group_size, int) or isinstance(self.group_size, bool)
                    or self.group_size < 1):
                raise bad("group_size", self.group_size, "an integer >= 1 or auto (the "
                          "largest group that fits --worker-memory)")
        if self.worker_memory is not None and (
                isinstance(self.worker_memory, bool)
                or not isinstance(self.worker_memory, (int, float))
                or not math.isfinite(self.worker_memory) or self.worker_memory <= 0):
            raise bad("worker_memory", self.worker_memory, "a number of GiB > 0, such as 24")
        for name in (
            "num_samples",
            "seq_len",
            "batch_size",
            "num_workers",
            "num_stores",
            "blocksize",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, value, "an integer >= 1")
        if (not isinstance(self.segment_symbols, int) or isinstance(self.segment_symbols, bool)
                or not 1 <= self.segment_symbols <= 65533):
            raise bad("segment_symbols", self.segment_symbols,
                      "an integer in 1..65533 (default 4096)")
        if not isinstance(self.eval_samples, int) or self.eval_samples < 0:
            raise bad("eval_samples", self.eval_samples, "an integer >= 0")
        for name in ("token_cap", "percdamp", "cpus_per_worker", "gpus_per_worker",
                     "rate_lambda"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value)):
                raise bad(name, value, "a finite number")
        if self.rate_lambda < 0:
            raise bad("rate_lambda", self.rate_lambda, "a number >= 0 (0: plain GPTQ rounding)")
        if self.rate_lambda and self.scheme not in ("ternary", "ternary-sym256", "int2"):
            raise bad("rate_lambda", self.rate_lambda, "0 with --scheme "
                      f"{self.scheme} (stored bit-packed: every code costs the same bits; rate-"
                      "aware rounding pays off for the entropy-coded ternary and int2)")
        if self.rate_lambda and self.method != "gptq":
            raise bad("rate_lambda", self.rate_lambda, "0 with --method rtn (rate-aware "
                      "rounding is part of the GPTQ sweep)")
        self._check_prune(bad)
        self._check_trim(bad)
        self._check_target(bad)
        if self.token_cap < 0:
            raise bad("token_cap", self.token_cap, "a number >= 0 (0 disables the cap)")
        if not 0 <= self.percdamp < 10:
            raise bad("percdamp", self.percdamp, "a fraction such as 0.1 (0 <= percdamp < 10)")
        if self.quant_group_size is not None:
            if self.scheme == "ternary":
                raise bad(
                    "quant_group_size",
                    self.quant_group_size,
                    "None for the ternary scheme (ternary scales are per row)",
                )
            if self.scheme == "ternary-sym256" and self.quant_group_size != 256:
                raise bad("quant_group_size", self.quant_group_size,
                          "None or 256 for ternary-sym256 (its scale blocks are GGUF's 256)")
            if self.quant_group_size < 1:
                raise bad("quant_group_size", self.quant_group_size, "None or an integer >= 1")
        if self.cpus_per_worker <= 0:
            raise bad("cpus_per_worker", self.cpus_per_worker, "a number > 0")
        if self.gpus_per_worker < 0:
            raise bad("gpus_per_worker", self.gpus_per_worker, "a number >= 0")
        if not self.output:
            raise bad("output", self.output, "a URL or path to write the checkpoint to")

    def _check_prune(self, bad: Any) -> None:
        from qmoe_ray.quant.prune import PRUNE_METHODS, parse_pattern

        if self.prune is None:
            for name in ("sparsity", "prune_pattern"):
                if getattr(self, name) is not None:
                    raise bad(name, getattr(self, name), "no value without --prune METHOD "
                              f"(one of {', '.join(PRUNE_METHODS)})")
            return
        if self.prune not in PRUNE_METHODS:
            raise bad("prune", self.prune, f"one of {', '.join(PRUNE_METHODS)}")
        if (self.sparsity is None) == (self.prune_pattern is None):
            raise bad("prune", self.prune, "one of --sparsity FRACTION (unstructured) or "
                      "--prune-pattern N:M with it, not " + ("both" if self.sparsity is not None
                                                             else "neither"))
        if self.sparsity is not None and (isinstance(self.sparsity, bool)
                                          or not isinstance(self.sparsity, (int, float))
                                          or not 0 <= self.sparsity < 1):
            raise bad("sparsity", self.sparsity, "a fraction in [0, 1), such as 0.5")
        if self.prune_pattern is not None:
            try:
                parse_pattern(self.prune_pattern)
            except ValueError:
                raise bad("prune_pattern", self.prune_pattern,
                          "N:M with 1 <= N < M, such as 2:4 or 4:8") from None
        if self.prune == "sparsegpt" and self.method != "gptq":
            raise bad("prune", self.prune, "magnitude or wanda with --method rtn (SparseGPT "
                      "chooses its mask inside the GPTQ sweep)")
        if self.prune == "sparsegpt" and self.prune_pattern is not None and self.actorder:
            raise bad("prune_pattern", self.prune_pattern, "used with --no-actorder for "
                      "--prune sparsegpt (N:M groups are consecutive input columns; act-order "
                      "sweeps them out of order)")

    def _check_target(self, bad: Any) -> None:
        t = self.target_bits
        if t is None:
            return
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise bad("target_bits", t, "a number of bits per expert parameter > 0, such as 1.5")
        why = "the allocation chooses every matrix's scheme and rate-aware lambda itself"
        if self.scheme != "ternary":
            raise bad("scheme", self.scheme, f"left out with --target-bits ({why})")
        if self.rate_lambda:
            raise bad("rate_lambda", self.rate_lambda, f"0 with --target-bits ({why})")
        if self.method != "gptq":
            raise bad("method", self.method, "gptq with --target-bits (the candidates are "
                      "GPTQ settings)")
        if self.quant_group_size is not None:
            raise bad("quant_group_size", self.quant_group_size, "None with --target-bits (the "
                      "candidates' int grids are per row)")
        if self.prune is not None:
            raise bad("prune", self.prune, "None with --target-bits (pruning is not among the "
                      "allocation's candidates)")

    def _check_trim(self, bad: Any) -> None:
        from qmoe_ray.models.trim_plan import parse_expert_budget

        for name in ("drop_layers", "drop_blocks"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad(name, v, "a whole number >= 0")
        if self.drop_experts is not None:
            try:
                parse_expert_budget(self.drop_experts)
            except InputError:
                raise bad("drop_experts", self.drop_experts, "N (across MoE layers) or "
                          "N/layer") from None
        if self.trim_plan is not None and self.trim_budgets():
            raise bad("trim_plan", self.trim_plan, "no plan with --drop-experts/--drop-layers/"
                      "--drop-blocks (a plan holds its own choice): give one or the other")
        if self.trim_plan is not None and not isinstance(self.trim_plan, str):
            raise bad("trim_plan", self.trim_plan, "the path or URL of a plan file")

    def trim_budgets(self) -> bool:
        """Whether budgets ask the job to trim (an expert, layer or block budget above 0)."""
        from qmoe_ray.models.trim_plan import parse_expert_budget

        return bool(parse_expert_budget(self.drop_experts)[0] or self.drop_layers
                    or self.drop_blocks)

    # Options that change the output bytes: a resumed run must agree on all of them.
    def output_options(self) -> dict[str, Any]:
        """The options that determine the output (everything but where and how it runs)."""
        runtime = {
            "output",
            "num_workers",
            "num_stores",
            "cpus_per_worker",
            "worker_memory",  # under group_size auto: the job's record holds the sizes chosen
            "gpus_per_worker",
            "address",
            "overwrite",
        }
        from qmoe_ray.storage.fs import redact

        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in runtime}
        # recorded in the manifest, the reports and the progress record: no credentials
        out["source"], out["data"] = redact(self.source), redact(self.data)
        # the plan's file is where it came from; its content is the job's (``job["trim"]``,
        # compared on resume, and the manifest's ``trim`` record)
        out.pop("trim_plan")
        if self.target_bits is None:  # one scheme: the options (and records) of before budgets
            out.pop("target_bits")
        if not self.trim_budgets():  # untrimmed: the options (and records) of before trimming
            for k in ("drop_experts", "drop_layers", "drop_blocks"):
                out.pop(k)
        for k, v in UNRECORDED.items():  # the records of before the option
            if out.get(k) == v:
                out.pop(k)
        return out

    def to_json(self) -> str:
        """The config as JSON (safe to write: holds no credentials)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> CompressConfig:
        """Build from a mapping (YAML file, CLI); dashes in keys become underscores.

        Raises:
            ValueError: an unknown key (the message lists the valid ones) or a bad value.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        clean: dict[str, Any] = {}
        for key, value in values.items():
            k = str(key).replace("-", "_")
            if k not in names:
                raise InputError(
                    f"unknown config key {key!r}; valid keys: {', '.join(sorted(names))}"
                )
            clean[k] = value
        return cls(**clean)


@dataclass
class StorageOptions:
    """fsspec storage options for the source and the output (kept out of every file we write)."""

    source: dict[str, Any] = field(default_factory=dict)
    output: dict[str, Any] = field(default_factory=dict)
