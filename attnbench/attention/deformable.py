"""Deformable attention (DAT, Xia et al., CVPR 2022).

An offset network reads the queries and moves a uniform grid of (H/r) x (W/r) reference
points; keys and values are projected from the input sampled bilinearly at the moved
points, and every query attends to all the samples. Offsets are bounded with tanh to
``offset_range`` reference cells (``offset_range * stride`` tokens) and the points are
clamped to the map, so every sample is a convex mix of the four nearest tokens.

The attention map spreads each sample's weight over its four tokens with the bilinear
weights. With ``groups > 1`` a sample mixes the groups' points in one projection, and the
map averages the groups' spreads: a faithful picture, exact only for ``groups=1``.

Departures from DAT: projections are Linear layers (the same maths as its 1x1 convs), and
the relative position bias DAT adds to the logits is left out.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .base import AttentionBase, AttentionMap, Mark, check_range, stage
from .registry import Param, Shape, register_attention


def deformable_macs(s: Shape, p: dict) -> int:
    """DAT, Sec. 3.3: 2N Ns C + 2NC^2 + 2Ns C^2 + (k^2 + 2) Ns C, Ns = Hk Wk samples, plus
    9 Ns C: fvcore's convention for the offset net's LayerNorm (5 per value) and the bilinear
    sampling (4 per value), which the paper leaves out."""
    r, k, C, N = p["stride"], p["kernel"], s.dim, s.tokens
    Ns = -(-s.height // r) * -(-s.width // r)
    return s.batch * (2 * N * Ns * C + 2 * N * C * C + 2 * Ns * C * C + (k * k + 2) * Ns * C + 9 * Ns * C)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of an NCHW map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def deformable_rules(shape: Shape | None, p: dict) -> None:
    heads, groups = (shape.heads if shape else p["num_heads"]), p["groups"]
    if not 1 <= groups <= heads:
        raise ValueError(f"parameter 'groups' = {groups} is out of range; allowed 1..{heads} (num_heads)")
    if heads % groups:
        raise ValueError(f"parameter 'groups' = {groups} must divide num_heads = {heads}")
    if p["kernel"] % 2 == 0:
        raise ValueError(f"parameter 'kernel' = {p['kernel']} must be odd")


@register_attention(
    "deformable",
    "DAT deformable attention: every query attends to (H/r)x(W/r) keys sampled at learned offsets",
    [
        Param("stride", 8, "reference grid stride r (keys = ceil(H/r) * ceil(W/r))", low=1),
        Param("groups", 1, "offset groups (divides num_heads)", low=1, range_text="divisor of num_heads"),
        Param("offset_range", 2.0, "largest offset, in reference cells", low=0.0),
        Param("kernel", 9, "offset network depthwise conv kernel (odd)", low=1),
    ],
    macs=deformable_macs,
    check=deformable_rules,
    demo={"stride": 4},
    compiles=True,
)
class DeformableAttention(AttentionBase):
    output_projection = "proj_out"
    projections = {"proj_q": "q", "proj_k": "k", "proj_v": "v"}

    def __init__(
        self, dim: int, num_heads: int, stride: int = 8, groups: int = 1, offset_range: float = 2.0, kernel: int = 9
    ) -> None:
        super().__init__(dim, num_heads)
        check_range("stride", stride, 1)
        check_range("kernel", kernel, 1)
        deformable_rules(None, {"groups": groups, "kernel": kernel, "num_heads": num_heads})
        self.stride, self.groups, self.offset_range, self.kernel = stride, groups, offset_range, kernel
        cg = dim // groups
        self.proj_q = nn.Linear(dim, dim)
        self.proj_k = nn.Linear(dim, dim)
        self.proj_v = nn.Linear(dim, dim)
        self.proj_out = nn.Linear(dim, dim)
        self.conv_offset = nn.Sequential(
            nn.Conv2d(cg, cg, kernel, stride, kernel // 2, groups=cg),
            ChannelLayerNorm(cg),
            nn.GELU(),
            nn.Conv2d(cg, 2, 1, bias=False),
        )

    def sample_points(self, q: Tensor) -> Tensor:
        """(B, H, W, C) queries -> (B*G, Hk, Wk, 2) sample points (y, x) in [-1, 1]."""
        B, H, W, C = q.shape
        G, r = self.groups, self.stride
        q_off = q.view(B, H, W, G, C // G).permute(0, 3, 4, 1, 2).reshape(B * G, C // G, H, W)
        offset = self.conv_offset(q_off)  # (B*G, 2, Hk, Wk)
        Hk, Wk = offset.shape[2:]
        to_norm = offset.new_tensor([2.0 / max(H - 1, 1), 2.0 / max(W - 1, 1)])
        # reference points: the centres of the r x r cells, in token coordinates
        ys = ((torch.arange(Hk, device=q.device) * r + (r - 1) / 2).clamp(max=H - 1)).to(q.dtype)
        xs = ((torch.arange(Wk, device=q.device) * r + (r - 1) / 2).clamp(max=W - 1)).to(q.dtype)
        ref = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1) * to_norm - 1
        shift = offset.permute(0, 2, 3, 1).tanh() * (self.offset_range * r) * to_norm
        return (ref + shift).clamp(-1, 1)

    def sample(self, x: Tensor, points: Tensor) -> Tensor:
        """Bilinear samples of x at the points: (B, Ns, C)."""
        B, H, W, C = x.shape
        G = self.groups
        xg = x.view(B, H, W, G, C // G).permute(0, 3, 4, 1, 2).reshape(B * G, C // G, H, W)
        s = F.grid_sample(xg, points.flip(-1), mode="bilinear", padding_mode="zeros", align_corners=True)
        return s.reshape(B, C, -1).transpose(1, 2)

    def heads(self, t: Tensor) -> Tensor:
        """(B, L, C) -> (B, heads, L, head_dim)"""
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        B, H, W, C = x.shape
        with stage("query projection"):
            q = self.proj_q(x)
        with stage("offsets"):
            points = self.sample_points(q)
        with stage("sampling"):
            samples = self.sample(x, points)
        with stage("key/value projection"):
            k, v = self.proj_k(samples), self.proj_v(samples)
        with stage("attention"):
            out = F.scaled_dot_product_attention(self.heads(q.view(B, H * W, C)), self.heads(k), self.heads(v), scale=self.scale)
        with stage("output projection"):
            return self.proj_out(out.transpose(1, 2).reshape(B, H, W, C))

    def token_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Keys and values projected at the tokens instead of at the sample points."""
        t = x[:1].flatten(1, 2)
        q, k, v = (self.heads(proj(t))[0] for proj in (self.proj_q, self.proj_k, self.proj_v))
        return q * self.scale, k, v

    @torch.no_grad()
    def attention_map(self, x: Tensor, queries: Sequence[tuple[int, int]]) -> AttentionMap:
        x, queries = self.first_item(x, queries)
        _, H, W, C = x.shape
        q = self.proj_q(x)
        points = self.sample_points(q)  # (G, Hk, Wk, 2)
        k = self.heads(self.proj_k(self.sample(x, points)))[0]  # (heads, Ns, d)
        tokens = self.query_ids(queries, W, x.device)
        qi = self.heads(q.view(1, H * W, C))[0][:, tokens]  # (heads, Q, d)
        probs = ((qi * self.scale) @ k.transpose(-2, -1)).softmax(-1)  # (heads, Q, Ns)
        spread = bilinear_spread(points.flatten(1, 2), H, W).mean(0)  # (Ns, H*W), groups averaged
        weights = (probs @ spread).transpose(0, 1).reshape(len(queries), self.num_heads, H, W)
        values = self.heads(self.proj_v(x).view(1, H * W, C))[0].view(self.num_heads, H, W, -1)
        ys = (points[..., 0] + 1) / 2 * (H - 1)
        xs = (points[..., 1] + 1) / 2 * (W - 1)
        samples = torch.stack([ys, xs], -1).flatten(1, 2).cpu()  # (G, Ns, 2) token coords
        marks = [Mark("points", samples.reshape(-1, 2).tolist())]  # every query sees the same samples
        return AttentionMap(queries, weights, values, {"samples": samples}, [marks] * len(queries))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, stride={self.stride}, groups={self.groups}, "
            f"offset_range={self.offset_range}, kernel={self.kernel}"
        )


def bilinear_spread(points: Tensor, H: int, W: int) -> Tensor:
    """(G, Ns, 2) points in [-1, 1] (y, x) -> (G, Ns, H*W): each point's bilinear weights
    over the tokens, as grid_sample with align_corners=True uses them."""
    py = (points[..., 0] + 1) / 2 * (H - 1)
    px = (points[..., 1] + 1) / 2 * (W - 1)
    y0, x0 = py.floor().clamp(0, H - 1), px.floor().clamp(0, W - 1)
    fy, fx = py - y0, px - x0
    out = points.new_zeros(*points.shape[:2], H * W)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            idx = ((y0 + dy).clamp(max=H - 1) * W + (x0 + dx).clamp(max=W - 1)).long()
            out.scatter_add_(-1, idx.unsqueeze(-1), (wy * wx).unsqueeze(-1))
    return out
