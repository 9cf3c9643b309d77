"""A peer quantizer's run, for ``jobs/benchmark.py peers``: runs in the peers' own virtual
environment (llm-compressor, auto-round, their torch and transformers), never in the project's.

``python -P _peer_quant.py SPEC.json``. The spec (written by ``qmoe_ray.bench.peers``) names:
``model`` (an HF checkpoint folder), ``calib`` (``.npy`` int token ids ``[N, S]``, the job's own
calibration samples), ``method`` (``"gptq"`` | ``"autoround"``), ``bits``, ``group_size``,
``targets`` / ``ignore`` (llm-compressor module patterns: experts only), ``out`` (a folder).

It loads the checkpoint with transformers, linearizes the fused experts (llm-compressor's own
``linearize_moe``: one ``Linear`` per expert matrix), runs ``oneshot`` with the method's modifier
on those samples and writes to ``out``:

- ``weights.safetensors``: the *fake-quantized* weight (``module.weight`` after ``oneshot``: the
  dequantized grid values the modifier chose) of every module it quantized, under the module's
  name plus ``.weight``, in the model's dtype;
- ``peer.json``: versions, the modules quantized, their group counts, and seconds (load,
  ``oneshot``, total).

Nothing of qmoe_ray is imported: this file runs where qmoe_ray is not installed (``-P`` keeps
this folder, whose module names shadow packages, off ``sys.path``).
"""

from __future__ import annotations

import json
import sys
import time


def _scheme(spec: dict) -> dict:
    weights = {"num_bits": int(spec["bits"]), "type": "int", "symmetric": False,
               "strategy": "group", "group_size": int(spec["group_size"])}
    return {"group_0": {"targets": spec["targets"], "weights": weights,
                        "input_activations": None, "output_activations": None}}


def main(path: str) -> int:
    t_start = time.perf_counter()
    with open(path) as f:
        spec = json.load(f)
    import llmcompressor
    import numpy as np
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(int(spec.get("seed", 0)))
    torch.set_num_threads(int(spec.get("threads", torch.get_num_threads())))
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype="auto")
    linearize_moe(model)
    ids = np.load(spec["calib"]).astype(np.int64)
    data = Dataset.from_dict({"input_ids": ids.tolist(),
                              "attention_mask": np.ones_like(ids).tolist()})
    if spec["method"] == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        recipe = GPTQModifier(config_groups=_scheme(spec), ignore=spec["ignore"])
    elif spec["method"] == "autoround":
        from llmcompressor.modifiers.autoround import AutoRoundModifier

        recipe = AutoRoundModifier(config_groups=_scheme(spec), ignore=spec["ignore"],
                                   iters=int(spec.get("iters", 200)),
                                   # its tuning batch must hold oneshot's batch (its default 8
                                   # under oneshot's 16 reads the batch as the sequence: refused)
                                   batch_size=int(spec.get("batch_size", 16)),
                                   enable_torch_compile=False)
    else:
        raise SystemExit(f"unknown method {spec['method']!r}: gptq or autoround")
    t_loaded = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=len(ids),
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False,
            batch_size=int(spec.get("batch_size", 16)))
    t_done = time.perf_counter()
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, list[int]] = {}
    linear = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linear.append(name)
        scale = getattr(module, "weight_scale", None)
        if isinstance(module, torch.nn.Linear) and scale is not None:
            out[f"{name}.weight"] = module.weight.detach().cpu().contiguous()
            groups[name] = list(scale.shape)
    save_file(out, f"{spec['out']}/weights.safetensors")
    import transformers

    info = {"llmcompressor": llmcompressor.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "method": spec["method"],
            "bits": spec["bits"], "group_size": spec["group_size"], "quantized": sorted(groups),
            "linear": linear,
            "scale_shapes": groups, "load_s": t_loaded - t_start,
            "oneshot_s": t_done - t_loaded, "total_s": time.perf_counter() - t_start}
    if spec["method"] == "autoround":
        import auto_round

        info["auto_round"] = auto_round.__version__
    with open(f"{spec['out']}/peer.json", "w") as f:
        json.dump(info, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
