"""The Gated DeltaNet token mixer (Qwen3-Next, Qwen3.5): ``DeltaNetSpec``, ``gated_delta_net``
and the chunked gated delta rule in plain torch.

Why a kind of its own: the hybrid families replace three of every four attention layers with a
linear-attention layer whose state is a ``[k_dim, v_dim]`` matrix per value head, updated by the
gated delta rule (Yang et al., "Gated Delta Networks", 2024, eq. 10)::

    S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - exp(g_t) S_{t-1}^T k_t))^T,    o_t = S_t^T q_t

with q, k L2-normalised per head (q also scaled by ``k_dim^-1/2``), ``beta = sigmoid(b)`` and the
decay ``g = -exp(A_log) softplus(a + dt_bias)``. The layer around it: one input projection (or four,
see below), a causal depthwise ``conv1d`` (kernel ``linear_conv_kernel_dim``) + SiLU over the
concatenated q/k/v channels, the rule, an RMSNorm of each head's output gated by ``silu(z)``
(plain weight, not ``1 + w``), and ``out_proj``.

The rule is computed in chunks of ``CHUNK`` tokens (the DeltaNet paper's WY form, sec. 3.2: within
a chunk the sequential updates collapse into one unit-lower-triangular solve; across chunks the
state is carried in a loop), always over whole samples from position 0 with a zero initial state:
every call sees a sample's full sequence, so the state is per sample by construction (the
activation stores batch whole samples, never pieces of one). Padding (right-padded rows) is zeroed
before the projections, as the reference does.

Two input layouts:

- ``"interleaved"`` (Qwen3-Next): ``in_proj_qkvz`` ``[2 Kd + 2 Vd, d]`` whose rows are grouped per
  key head as ``[q_h | k_h | v of its value heads | z of its value heads]``, and ``in_proj_ba``
  ``[2 Hv, d]`` grouped per key head as ``[b of its value heads | a of them]``;
- ``"separate"`` (Qwen3.5): ``in_proj_qkv`` ``[2 Kd + Vd, d]`` (q, k, v contiguous),
  ``in_proj_z`` ``[Vd, d]``, ``in_proj_b`` and ``in_proj_a`` ``[Hv, d]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from qmoe_ray.models import layers as L
from qmoe_ray.models.config import MAX_HEAD_DIM, MAX_HEADS, config_float, config_int

CHUNK = 64  #: tokens per chunk of the chunked delta rule
L2_EPS = 1e-6  #: epsilon of the q/k L2 normalisation
LAYOUTS = ("interleaved", "separate")

Get = Callable[[str, tuple[int, ...]], torch.Tensor]
Opt = Callable[[str], "torch.Tensor | None"]


@dataclass(frozen=True)
class DeltaNetSpec:
    """Sizes of one Gated DeltaNet layer.

    Attributes:
        hidden: model width. k_heads, v_heads: key/query heads and value heads (a multiple).
        k_dim, v_dim: per-head key and value dimensions. conv: the depthwise kernel length.
        eps: the gated RMSNorm's epsilon. layout: ``"interleaved"`` or ``"separate"``.
    """

    hidden: int
    k_heads: int
    v_heads: int
    k_dim: int
    v_dim: int
    conv: int
    eps: float
    layout: str

    @property
    def key_size(self) -> int:
        return self.k_heads * self.k_dim

    @property
    def value_size(self) -> int:
        return self.v_heads * self.v_dim

    @property
    def conv_channels(self) -> int:
        return 2 * self.key_size + self.value_size

    @classmethod
    def from_config(cls, c: Mapping[str, Any], hidden: int, layout: str) -> DeltaNetSpec:
        """The sizes from ``config.json`` (``linear_*`` fields).

        Raises:
            CheckpointError: a size missing, not an integer or out of bounds.
            ValueError: value heads not a multiple of key heads, or an unknown layout.
        """
        if layout not in LAYOUTS:
            raise ValueError(f"Gated DeltaNet layout {layout!r}: expected one of {LAYOUTS}")
        spec = cls(
            hidden=hidden,
            k_heads=config_int(c, "linear_num_key_heads", MAX_HEADS),
            v_heads=config_int(c, "linear_num_value_heads", MAX_HEADS),
            k_dim=config_int(c, "linear_key_head_dim", MAX_HEAD_DIM),
            v_dim=config_int(c, "linear_value_head_dim", MAX_HEAD_DIM),
            conv=config_int(c, "linear_conv_kernel_dim", 64),
            eps=config_float(c, "rms_norm_eps", 1e-6),
            layout=layout,
        )
        if spec.v_heads % spec.k_heads:
            raise ValueError(
                f"config.json linear_num_value_heads={spec.v_heads} is not a multiple of "
                f"linear_num_key_heads={spec.k_heads}"
            )
        return spec

    def shapes(self, p: str) -> dict[str, tuple[int, ...]]:
        """Every tensor under the layer prefix ``p`` (``model.layers.i.linear_attn``)."""
        d, hv = self.hidden, self.v_heads
        out: dict[str, tuple[int, ...]] = {
            f"{p}.conv1d.weight": (self.conv_channels, 1, self.conv),
            f"{p}.A_log": (hv,),
            f"{p}.dt_bias": (hv,),
            f"{p}.norm.weight": (self.v_dim,),
            f"{p}.out_proj.weight": (d, self.value_size),
        }
        if self.layout == "interleaved":
            out[f"{p}.in_proj_qkvz.weight"] = (2 * self.key_size + 2 * self.value_size, d)
            out[f"{p}.in_proj_ba.weight"] = (2 * hv, d)
        else:
            out[f"{p}.in_proj_qkv.weight"] = (self.conv_channels, d)
            out[f"{p}.in_proj_z.weight"] = (self.value_size, d)
            out[f"{p}.in_proj_b.weight"] = (hv, d)
            out[f"{p}.in_proj_a.weight"] = (hv, d)
        return out


def _project(spec: DeltaNetSpec, get: Get, p: str, x: torch.Tensor):
    """``(qkv [B,S,conv_channels], z [B,S,Hv,Vd], b [B,S,Hv], a [B,S,Hv])`` from either layout."""
    bsz, n, d = x.shape
    hk, hv, kd, vd = spec.k_heads, spec.v_heads, spec.k_dim, spec.v_dim
    if spec.layout == "separate":
        qkv = L.linear(x, get(f"{p}.in_proj_qkv.weight", (spec.conv_channels, d)))
        z = L.linear(x, get(f"{p}.in_proj_z.weight", (spec.value_size, d))).view(bsz, n, hv, vd)
        b = L.linear(x, get(f"{p}.in_proj_b.weight", (hv, d)))
        a = L.linear(x, get(f"{p}.in_proj_a.weight", (hv, d)))
        return qkv, z, b, a
    r = hv // hk  # value heads per key head
    w = get(f"{p}.in_proj_qkvz.weight", (2 * spec.key_size + 2 * spec.value_size, d))
    per_head = L.linear(x, w).view(bsz, n, hk, 2 * kd + 2 * r * vd)
    q, k, v, z = per_head.split([kd, kd, r * vd, r * vd], dim=-1)
    ba = L.linear(x, get(f"{p}.in_proj_ba.weight", (2 * hv, d))).view(bsz, n, hk, 2 * r)
    b, a = ba.split([r, r], dim=-1)
    qkv = torch.cat([t.reshape(bsz, n, -1) for t in (q, k, v)], dim=-1)
    return qkv, z.reshape(bsz, n, hv, vd), b.reshape(bsz, n, hv), a.reshape(bsz, n, hv)


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Causal depthwise convolution + SiLU of ``x`` ``[B, S, C]`` by ``weight`` ``[C, 1, K]``:
    position ``t`` sees ``t - K + 1 .. t`` (zeros before the sample's start)."""
    n, k = x.shape[1], weight.shape[-1]
    y = F.conv1d(x.transpose(1, 2), weight, bias, padding=k - 1, groups=weight.shape[0])
    return F.silu(y[..., :n]).transpose(1, 2)


def _l2(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2_EPS)


def chunk_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """The gated delta rule over whole sequences, in chunks (see the module doc), zero initial
    state.

    Args:
        q, k: ``[B, H, S, Kd]`` (already L2-normalised; q also scaled); v: ``[B, H, S, Vd]``;
        g: ``[B, H, S]`` log decays (<= 0); beta: ``[B, H, S]`` write strengths; float32.

    Returns:
        ``[B, H, S, Vd]`` outputs ``o_t = S_t^T q_t``.
    """
    bsz, h, n, kd = k.shape
    vd = v.shape[-1]
    pad = (-n) % chunk
    if pad:  # zero keys/values/betas and no decay after the end: earlier outputs are unchanged
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (F.pad(t, (0, pad)) for t in (g, beta))
    m = (n + pad) // chunk
    q, k, v = (t.reshape(bsz, h, m, chunk, t.shape[-1]) for t in (q, k, v))
    g, beta = g.reshape(bsz, h, m, chunk), beta.reshape(bsz, h, m, chunk)
    gam = g.cumsum(-1)  # log decay from the chunk's start through each position
    causal = torch.ones(chunk, chunk, dtype=torch.bool).tril()
    # decay[i, j] = exp(gam_i - gam_j) for j <= i, 0 above the diagonal
    decay = (gam[..., :, None] - gam[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    kb = k * beta[..., None]
    # WY form: (I + strict_lower(beta_i k_i.k_j decay_ij)) [u | w] = [beta v | beta k exp(gam)]
    system = (kb @ k.transpose(-1, -2)) * decay
    rhs = torch.cat((v * beta[..., None], kb * gam.exp()[..., None]), dim=-1)
    uw = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    u, w = uw.split([vd, kd], dim=-1)
    inner = (q @ k.transpose(-1, -2)) * decay  # within-chunk attention, diagonal included
    q_dec = q * gam.exp()[..., None]  # reads of the state at the chunk's start
    k_dec = k * (gam[..., -1:] - gam).exp()[..., None]  # writes, decayed to the chunk's end
    end = gam[..., -1].exp()[..., None, None]
    state = torch.zeros(bsz, h, kd, vd, dtype=v.dtype)
    out = torch.empty_like(v)
    for c in range(m):
        v_new = u[:, :, c] - w[:, :, c] @ state
        out[:, :, c] = q_dec[:, :, c] @ state + inner[:, :, c] @ v_new
        state = state * end[:, :, c] + k_dec[:, :, c].transpose(-1, -2) @ v_new
    return out.reshape(bsz, h, m * chunk, vd)[:, :, :n]


def gated_delta_net(
    spec: DeltaNetSpec, get: Get, opt: Opt, p: str, x: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """One Gated DeltaNet layer of ``x`` ``[B, S, d]`` -> ``[B, S, d]`` (float32).

    Args:
        spec: the sizes and the input layout.
        get: ``(name, shape) -> tensor`` (checks the shape); opt: ``name -> tensor or None``.
        p: the layer's tensor prefix (``...linear_attn``).
        mask: ``bool [B, S]`` real tokens (padding is zeroed before the projections).
    """
    x = x * mask[..., None].to(x.dtype)
    bsz, n, _ = x.shape
    hk, hv, kd, vd = spec.k_heads, spec.v_heads, spec.k_dim, spec.v_dim
    qkv, z, b, a = _project(spec, get, p, x)
    conv_w = get(f"{p}.conv1d.weight", (spec.conv_channels, 1, spec.conv))
    qkv = causal_conv(qkv, conv_w, opt(f"{p}.conv1d.bias"))
    q, k, v = qkv.split([spec.key_size, spec.key_size, spec.value_size], dim=-1)
    r = hv // hk
    q = _l2(q.reshape(bsz, n, hk, kd)).repeat_interleave(r, dim=2) * kd**-0.5
    k = _l2(k.reshape(bsz, n, hk, kd)).repeat_interleave(r, dim=2)
    v = v.reshape(bsz, n, hv, vd)
    beta = torch.sigmoid(b)
    a_log, dt_bias = get(f"{p}.A_log", (hv,)), get(f"{p}.dt_bias", (hv,))
    g = -a_log.float().exp() * F.softplus(a.float() + dt_bias)
    o = chunk_delta_rule(
        *(t.transpose(1, 2).contiguous() for t in (q, k, v)),
        g.transpose(1, 2).contiguous(), beta.transpose(1, 2).contiguous(),
    ).transpose(1, 2)
    o = L.rms_norm(o, get(f"{p}.norm.weight", (vd,)), spec.eps) * F.silu(z)
    return L.linear(o.reshape(bsz, n, spec.value_size), get(f"{p}.out_proj.weight",
                                                              (spec.hidden, spec.value_size)))
