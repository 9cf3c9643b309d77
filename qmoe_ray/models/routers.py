"""The sigmoid router kind (DeepSeek-V3, Kimi-K2, GLM-4.5, MiniMax-M2): ``SigmoidRouter``.

Why its own module: these routers score each expert independently (a sigmoid, not a softmax over
experts), choose with a learned per-expert bias that steers load balance but never enters the
gate weights (DeepSeek-V3 report, sec. 2.1.2, "auxiliary-loss-free load balancing"), may first
restrict each token to its best ``topk_group`` of ``n_group`` expert groups (a group scored by
the sum of its two best biased scores), renormalise the chosen weights and scale them by
``routed_scaling_factor``. One frozen spec covers every family of that shape; the softmax and
Switch routers stay in ``layers``.

Everything is float32, as the reference routers compute (the checkpoints keep the router weight
and the bias in float32 for that reason).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from qmoe_ray.models.config import MAX_EXPERTS, config_float, config_int


@dataclass(frozen=True)
class SigmoidRouter:
    """Sigmoid scores, bias-corrected choice, optional group limit, renormalised and scaled gates.

    Attributes:
        num_experts: routed experts ``E``.
        top_k: experts per token.
        n_group: expert groups (1: no group limit); ``E % n_group == 0``.
        topk_group: groups a token may choose from.
        renormalize: divide the chosen gates by their sum (``norm_topk_prob``).
        scale: ``routed_scaling_factor`` multiplying the gates.
        eps: added to the renormalising sum (DeepSeek/GLM: 1e-20; MiniMax: 0).
    """

    num_experts: int
    top_k: int
    n_group: int = 1
    topk_group: int = 1
    renormalize: bool = True
    scale: float = 1.0
    eps: float = 0.0

    def __post_init__(self) -> None:
        if self.num_experts % self.n_group:
            raise ValueError(
                f"config.json: n_routed_experts={self.num_experts} is not a multiple of "
                f"n_group={self.n_group}"
            )
        per = self.num_experts // self.n_group
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(
                f"config.json: topk_group={self.topk_group} must lie in 1..n_group={self.n_group}"
            )
        if self.n_group > 1 and per < 2:
            raise ValueError(
                f"config.json: n_group={self.n_group} leaves {per} expert per group; a group is "
                "scored by its best two"
            )
        if self.top_k > self.topk_group * per:
            raise ValueError(
                f"config.json: num_experts_per_tok={self.top_k} exceeds the {self.topk_group * per} "
                "experts of topk_group groups"
            )

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], num_experts: int, top_k: int, *, groups: bool = True,
        renormalize: bool | None = None, eps: float = 1e-20,
    ) -> SigmoidRouter:
        """The router a config describes (``n_group``, ``topk_group``, ``norm_topk_prob``,
        ``routed_scaling_factor``); ``groups=False`` / ``renormalize`` fix them for families
        without the fields (MiniMax-M2: no groups, always renormalised).

        Raises:
            ValueError / CheckpointError: inconsistent or out-of-bounds fields (named).
        """
        n_group = config_int(config, "n_group", MAX_EXPERTS, default=1) if groups else 1
        topk_group = config_int(config, "topk_group", MAX_EXPERTS, default=1) if groups else 1
        renorm = bool(config.get("norm_topk_prob", True)) if renormalize is None else renormalize
        scale = config_float(config, "routed_scaling_factor", 1.0) if groups else 1.0
        return cls(num_experts, top_k, n_group, topk_group, renorm, scale, eps)

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Route tokens ``x`` ``[..., d]`` with router ``weight`` ``[E, d]`` and correction
        ``bias`` ``[E]``.

        Returns:
            ``(idx int64 [..., k], gate float32 [..., k])``.
        """
        lead = x.shape[:-1]
        xf = x.reshape(-1, x.shape[-1]).to(torch.float32)
        scores = torch.sigmoid(xf @ weight.to(torch.float32).T)
        choice = scores + bias.to(torch.float32)
        if self.n_group > 1:
            per = self.num_experts // self.n_group
            grouped = choice.view(-1, self.n_group, per)
            group_score = grouped.topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(self.topk_group, dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(per, dim=1), float("-inf"))
        idx = choice.topk(self.top_k, dim=-1).indices
        gate = scores.gather(1, idx)
        if self.renormalize:
            gate = gate / (gate.sum(-1, keepdim=True) + self.eps)
        gate = gate * self.scale
        return idx.reshape(*lead, self.top_k).to(torch.int64), gate.reshape(*lead, self.top_k)
