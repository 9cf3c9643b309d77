"""Reusable test fixtures: a moto S3 server on 127.0.0.1 and tiny transformers-saved MoEs.

Import what you need in a test module::

    from fixtures_s3 import moto_endpoint, s3_credentials, make_bucket, save_tiny  # noqa: F401

(pytest puts the tests folder on sys.path; no package import needed).

``moto_endpoint`` (session scope) starts ``moto.server.ThreadedMotoServer`` on a free loopback port
and stops it at teardown; ``s3_credentials`` puts fake credentials in the environment for one test
only. Nothing here leaves the machine. transformers is used only here and in tests (the oracle).
"""

from __future__ import annotations

import copy
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

FAKE_KEY = "testing-key-id"
FAKE_SECRET = "testing-secret-value"


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """``http://127.0.0.1:<port>`` of a moto S3 server running for the whole session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_credentials(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Fake AWS credentials in the environment (this test only); returns them."""
    env = {
        "AWS_ACCESS_KEY_ID": FAKE_KEY,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    return env


def s3fs_for(endpoint: str) -> Any:
    """A fresh (uncached) s3fs filesystem talking to ``endpoint``."""
    import s3fs

    return s3fs.S3FileSystem(
        client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True, use_listings_cache=False
    )


def make_bucket(endpoint: str, bucket: str) -> Any:
    """Create ``bucket`` on the moto server; returns an s3fs filesystem for it."""
    fs = s3fs_for(endpoint)
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    return fs


def upload_dir(fs: Any, local: str | os.PathLike[str], remote: str) -> list[str]:
    """Copy every file of the local folder ``local`` to ``remote`` (``bucket/prefix``)."""
    out = []
    for p in sorted(Path(local).rglob("*")):
        if p.is_file():
            key = f"{remote.rstrip('/')}/{p.relative_to(local).as_posix()}"
            fs.pipe_file(key, p.read_bytes())
            out.append(key)
    return out


# -- tiny MoE checkpoints -------------------------------------------------------------------------
COMMON = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILY_KW: dict[str, dict[str, Any]] = {
    "mixtral": dict(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2),
    "qwen2_moe": dict(
        intermediate_size=40,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=20,
        num_experts=6,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
    ),
    "qwen3_moe": dict(
        intermediate_size=40,
        moe_intermediate_size=24,
        num_experts=6,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        head_dim=16,
    ),
    "olmoe": dict(intermediate_size=24, num_experts=6, num_experts_per_tok=2, clip_qkv=3.0),
}


def tiny_model(model_type: str, seed: int = 0, **overrides: Any) -> Any:
    """A tiny random transformers ``*ForCausalLM`` of ``model_type`` in eval mode, fp32.

    Weights are re-drawn with a larger spread than transformers' init (std 0.02 makes every
    router near-uniform and every block near-identity, which would hide bugs): matrices
    ``N(0, 1/sqrt(fan_in))``, norm weights ``1 + N(0, 0.2)``, biases ``N(0, 0.1)``.
    """
    import transformers as tf

    cls = {
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM),
        "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM),
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM),
        "olmoe": (tf.OlmoeConfig, tf.OlmoeForCausalLM),
    }[model_type]
    cfg = cls[0](**{**COMMON, **FAMILY_KW[model_type], **overrides})
    torch.manual_seed(seed)
    return randomize(cls[1](cfg).eval(), torch.Generator().manual_seed(seed + 1))


def randomize(model: Any, g: torch.Generator) -> Any:
    """Re-draw ``model``'s parameters in place as ``tiny_model`` describes; returns it."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def layer_outputs(model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list]:
    """transformers' logits and each decoder layer's output (forward hooks)."""
    outs: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(
            lambda mod, i, o: outs.append(o[0] if isinstance(o, tuple) else o)
        )
        for layer in model.model.layers
    ]
    try:
        with torch.no_grad():
            res = model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return res.logits, outs


def save_tiny(
    model: Any, path: str | os.PathLike[str], dtype: torch.dtype = torch.float32, **kw: Any
) -> Path:
    """``model.save_pretrained(path)`` in safetensors, cast to ``dtype`` (``max_shard_size`` etc.
    pass through ``kw``); also writes a small ``tokenizer.json`` sibling. Returns the folder."""
    path = Path(path)
    m = copy.deepcopy(model).to(dtype) if dtype != torch.float32 else model
    m.save_pretrained(path, safe_serialization=True, **kw)
    (path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "WordLevel"}}')
    return path


def moto_checks_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on (this test only) the in-process moto server refuses the fake credentials, as a
    real endpoint refuses wrong keys."""
    import moto.core.authorization as auth
    from moto import settings

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setattr(auth.ActionAuthenticatorMixin, "request_count", 0)
