"""Bi-Level Routing Attention (BiFormer, Zhu et al., CVPR 2023).

Follows the official NHWC module (``BiLevelRoutingAttention`` in the BiFormer repository)
so that its checkpoints load and its outputs match:

1. with ``auto_pad`` the input is zero-padded bottom/right to a multiple of ``n_win``
   *before* the projection (padded tokens are then real keys, as there);
2. one Linear ``qkv.qkv`` gives q (qk_dim), k (qk_dim), v (dim), in that order;
3. the map is cut into n_win x n_win regions, row-major; region q and k are the means
   of each region's q and k;
4. region affinity (q_r * qk_dim^-0.5) k_r^T, shared by all heads; each region keeps its
   ``topk`` most affine regions (hard routing, no gradient through it);
5. every query attends to the tokens of its region's routed regions, scale qk_dim^-0.5;
6. lepe, a depthwise conv of kernel ``side_dwconv`` on v over the whole map, is added;
   the Linear ``wo`` projects; the padding is cropped off.

``impl=gather`` is the paper's computation: gather the routed key/value regions into a
topk-fold copy of an expanded view, then dense attention per region with its score
matrix. ``impl=sdpa`` (the default) computes the same outputs with the routed regions
indexed once and fused ``scaled_dot_product_attention`` per region, so no score matrix
is ever held.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .base import AttentionBase, AttentionMap, Mark, check_range, linear_rows, stage
from .registry import Param, Shape, register_attention


# routed keys and values copied per SDPA call: under glibc's largest threshold for serving an
# allocation with fresh pages (32 MiB), so that the chunks' copies reuse memory
GATHER_CHUNK_BYTES = 8 * 2**20


def _padded(s: Shape, p: dict) -> tuple[int, int]:
    S = p["n_win"]
    return (-(-s.height // S) * S, -(-s.width // S) * S) if p["auto_pad"] else (s.height, s.width)


def bra_macs(s: Shape, p: dict) -> int:
    """Np C (2 qk + C) + Np C^2 + S^4 qk + Np (k Np / S^2)(qk + C) + Np C K^2: qkv, wo, region
    routing, token attention, lepe on the Np padded tokens; with qk = C, BiFormer's
    4NC^2 + S^4 C + 2N(kN/S^2)C + NCK^2 (fvcore's count of the official module, exactly)."""
    S, k, K, C = p["n_win"], p["topk"], p["side_dwconv"], s.dim
    qk = p["qk_dim"] or C
    Hp, Wp = _padded(s, p)
    Np = Hp * Wp
    return s.batch * (Np * C * (2 * qk + C) + Np * C * C + S**4 * qk + Np * (k * Np // (S * S)) * (qk + C) + Np * C * K * K)


def bra_workspace(s: Shape, p: dict) -> int:
    """The routed keys and values, topk-fold (the fast form copies them a chunk at a time;
    compiled, at once); the gather form also holds its score matrix."""
    S, k = p["n_win"], p["topk"]
    Hp, Wp = _padded(s, p)
    n = Hp * Wp
    out = 2 * s.batch * k * n * s.dim * s.itemsize
    if p["impl"] == "gather":
        out += 2 * s.batch * s.heads * n * (k * n // (S * S)) * s.itemsize  # scores and probabilities
    return out


class QKVLinear(nn.Module):
    """One Linear producing q, k (qk_dim each) and v (dim); named as in BiFormer."""

    def __init__(self, dim: int, qk_dim: int) -> None:
        super().__init__()
        self.dim, self.qk_dim = dim, qk_dim
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.qkv(x).split([self.qk_dim, self.qk_dim, self.dim], dim=-1)

    def separate(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The same q, k, v as three contiguous tensors instead of views of one."""
        qk = self.qk_dim
        q, k, v = linear_rows(x, self.qkv, [slice(0, qk), slice(qk, 2 * qk), slice(2 * qk, 2 * qk + self.dim)])
        return q, k, v


def bra_rules(shape: Shape | None, p: dict) -> None:
    """topk within the regions, an odd lepe kernel, qk_dim split over the heads; with a shape,
    a map that auto_pad=false can split into n_win regions a side."""
    S, k = p["n_win"], p["topk"]
    if not 1 <= k <= S * S:
        raise ValueError(f"parameter 'topk' = {k} is out of range; allowed 1..{S * S} (n_win^2)")
    if p["side_dwconv"] and p["side_dwconv"] % 2 == 0:
        raise ValueError(f"parameter 'side_dwconv' = {p['side_dwconv']} must be odd (or 0 to disable lepe)")
    dim, heads = (shape.dim, shape.heads) if shape else (p["dim"], p["num_heads"])
    qk_dim = p["qk_dim"] or dim
    if qk_dim % heads:
        raise ValueError(f"qk_dim = {qk_dim} must be divisible by num_heads = {heads}")
    if shape and not p.get("auto_pad", True) and (shape.height % S or shape.width % S):
        raise ValueError(f"bra with auto_pad=false needs H and W divisible by n_win = {S}, got {shape.height}x{shape.width}")


@register_attention(
    "bra",
    "BiFormer bi-level routing: each n_win x n_win region attends to the tokens of its topk most affine regions",
    [
        Param("n_win", 7, "regions per side S", low=1),
        Param("topk", 4, "routed regions per region k", low=1, range_text="1..n_win^2"),
        Param("side_dwconv", 5, "lepe depthwise conv kernel (odd; 0 disables lepe)", low=0),
        Param("qk_dim", 0, "query/key width (0 = dim)", low=0),
        Param("auto_pad", True, "pad to a multiple of n_win before the projection, crop after"),
        Param("impl", "sdpa", "sdpa: routed regions indexed once, fused attention per region (no score matrix); "
              "gather: the official topk-fold gather, then dense attention", choices=("sdpa", "gather")),
    ],
    macs=bra_macs,
    check=bra_rules,
    workspace_bytes=bra_workspace,
    baseline={"impl": "gather"},
    demo={"n_win": 4, "topk": 4},
    compiles=True,
)
class BiLevelRoutingAttention(AttentionBase):
    output_projection = "wo"

    @property
    def projections(self) -> dict[str, list[tuple[str, int]]]:
        return {"qkv.qkv": [("q", self.qk_dim), ("k", self.qk_dim), ("v", self.dim)]}

    def __init__(
        self,
        dim: int,
        num_heads: int,
        n_win: int = 7,
        topk: int = 4,
        side_dwconv: int = 5,
        qk_dim: int = 0,
        auto_pad: bool = True,
        impl: str = "sdpa",
    ) -> None:
        super().__init__(dim, num_heads)
        check_range("n_win", n_win, 1)
        check_range("side_dwconv", side_dwconv, 0)
        bra_rules(None, {"n_win": n_win, "topk": topk, "side_dwconv": side_dwconv, "qk_dim": qk_dim, "dim": dim,
                         "num_heads": num_heads})
        qk_dim = qk_dim or dim
        self.n_win, self.topk, self.qk_dim = n_win, topk, qk_dim
        self.side_dwconv, self.auto_pad, self.impl = side_dwconv, auto_pad, impl
        self.scale = qk_dim**-0.5
        self.qkv = QKVLinear(dim, qk_dim)
        self.wo = nn.Linear(dim, dim)
        self.lepe = (
            nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim) if side_dwconv > 0 else None
        )

    # -- the stages, shared by forward and attention_map ---------------------------------

    def pad(self, x: Tensor) -> Tensor:
        H, W = x.shape[1:3]
        S = self.n_win
        if H % S or W % S:
            if not self.auto_pad:
                raise ValueError(f"bra with auto_pad=false needs H and W divisible by n_win = {S}, got {H}x{W}")
            x = F.pad(x, (0, 0, 0, (-W) % S, 0, (-H) % S))
        return x

    def regions(self, t: Tensor) -> Tensor:
        """(B, H, W, c) -> (B, S^2, h*w, c), regions row-major, tokens row-major inside."""
        B, H, W, c = t.shape
        S = self.n_win
        return t.view(B, S, H // S, S, W // S, c).transpose(2, 3).reshape(B, S * S, (H // S) * (W // S), c)

    def head_regions(self, t: Tensor) -> Tensor:
        """(B, H, W, m*c) -> (B, S^2, m, h*w, c) in one copy: the regions, each head's tokens
        contiguous, so that a routed (region, head) is one row to index and SDPA reads q as is."""
        B, H, W, C = t.shape
        S, m = self.n_win, self.num_heads
        h, w = H // S, W // S
        # contiguous even where reshape could return a view (a region one token high or wide)
        return t.view(B, S, h, S, w, m, C // m).permute(0, 1, 3, 5, 2, 4, 6).reshape(B, S * S, m, h * w, C // m).contiguous()

    def route(self, q_r: Tensor, k_r: Tensor) -> Tensor:
        """Region-level routing from the region means (B, S^2, qk_dim): (B, S^2, topk)
        indices of each region's most affine regions."""
        affinity = (q_r.detach() * self.scale) @ k_r.detach().transpose(-2, -1)
        return torch.topk(affinity, k=self.topk, dim=-1).indices

    def lepe_term(self, v: Tensor) -> Tensor:
        """lepe of v (B, H, W, dim) on the whole map; zeros without lepe."""
        if self.lepe is None:
            return torch.zeros_like(v)
        return self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def heads(self, t: Tensor) -> Tensor:
        """(..., L, m*c) -> (..., m, L, c)"""
        return t.unflatten(-1, (self.num_heads, -1)).transpose(-3, -2)

    # -- forward --------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        H_in, W_in = x.shape[1:3]
        if self.impl == "gather":  # the official fused projection and gather
            project, attend = self.qkv, self.token_attention_gather
        else:
            project, attend = self.qkv.separate, self.token_attention_sdpa
        with stage("projections"):
            q, k, v = project(self.pad(x))  # (B, H, W, c) each
        out = attend(q, k, v)  # (B, H, W, dim)
        with stage("lepe"):
            if self.lepe is not None:
                out = out + self.lepe_term(v)
        with stage("output projection"):
            out = self.wo(out)
            return out[:, :H_in, :W_in].contiguous() if out.shape[1:3] != (H_in, W_in) else out

    def token_attention_gather(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        B, H, W, _ = v.shape
        S = self.n_win
        with stage("projections"):
            q, k, v = self.regions(q), self.regions(k), self.regions(v)  # (B, S^2, w2, c)
        with stage("region routing"):
            r_idx = self.route(q.mean(2), k.mean(2))
        R, w2 = k.shape[1:3]
        with stage("gather"):
            idx = r_idx.view(B, R, self.topk, 1, 1)
            k_sel = torch.gather(k.unsqueeze(1).expand(-1, R, -1, -1, -1), 2, idx.expand(-1, -1, -1, w2, k.shape[-1]))
            v_sel = torch.gather(v.unsqueeze(1).expand(-1, R, -1, -1, -1), 2, idx.expand(-1, -1, -1, w2, v.shape[-1]))
            k_sel = self.heads(k_sel.flatten(2, 3))  # (B, R, m, topk*w2, c)
            v_sel = self.heads(v_sel.flatten(2, 3))
        with stage("token attention"):
            attn = (self.heads(q) * self.scale) @ k_sel.transpose(-2, -1)  # (B, R, m, w2, topk*w2)
            out = (attn.softmax(dim=-1) @ v_sel).transpose(-3, -2).flatten(-2)  # (B, R, w2, dim)
            return out.view(B, S, S, H // S, W // S, self.dim).transpose(2, 3).reshape(B, H, W, self.dim)

    def token_attention_sdpa(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The same attention without the expanded gather or a score matrix: each routed
        (region, head) of k and v is one contiguous row, copied once into the layout SDPA
        reads, and fused SDPA runs over the regions in chunks of at most
        :data:`GATHER_CHUNK_BYTES` of copied keys and values. The chunks bound the topk-fold
        copy (16-fold in BiFormer's stage 3) to a few MiB whatever the batch, and keep each
        copy small enough for the allocator to reuse memory instead of mapping fresh pages,
        whose faults made the copy run at a tenth of the memory bandwidth. Compiled, it is
        one chunk: the compiler plans its own buffers."""
        B, H, W, _ = v.shape
        S, m, n_sel = self.n_win, self.num_heads, self.topk
        with stage("projections"):
            q = self.head_regions(q)  # (B, S^2, m, w2, c); each projection freed once copied
            k = self.head_regions(k)
            v = self.head_regions(v)
        with stage("region routing"):
            r_idx = self.route(q.mean(3).flatten(2), k.mean(3).flatten(2))
        R, w2 = S * S, q.shape[3]
        # the source row (batch, region, head) of each (batch, region, head, routed) row
        batch = torch.arange(B, device=v.device).view(B, 1, 1, 1) * R
        head = torch.arange(m, device=v.device).view(1, 1, m, 1)
        rows = ((batch + r_idx.unsqueeze(2)) * m + head).view(B * R, m * n_sel)
        q, k, v = q.view(B * R, m, w2, -1), k.view(B * R * m, -1), v.view(B * R * m, -1)
        copied = m * n_sel * (k.shape[1] + v.shape[1]) * v.element_size()  # per region
        step = B * R if torch.compiler.is_compiling() else max(1, GATHER_CHUNK_BYTES // copied)
        out = q.new_empty(B * R, m, w2, v.shape[1] // w2)
        for start in range(0, B * R, step):
            end = min(start + step, B * R)
            with stage("gather"):
                chosen = rows[start:end].flatten()
                k_sel = k.index_select(0, chosen).view(end - start, m, n_sel * w2, -1)
                v_sel = v.index_select(0, chosen).view(end - start, m, n_sel * w2, -1)
            with stage("token attention"):
                out[start:end] = F.scaled_dot_product_attention(q[start:end], k_sel, v_sel, scale=self.scale)
        with stage("token attention"):
            out = out.view(B, S, S, m, H // S, W // S, -1).permute(0, 1, 4, 2, 5, 3, 6)
            return out.reshape(B, H, W, self.dim)

    def token_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """On the unpadded tokens (padding is BRA's, not the image's), scale qk_dim^-0.5 as BRA uses."""
        q, k, v = (self.heads(t.flatten(0, 1)) for t in self.qkv.separate(x[0]))  # (m, N, c)
        return q * self.scale, k, v

    # -- attention map --------------------------------------------------------------------

    @torch.no_grad()
    def attention_map(self, x: Tensor, queries: Sequence[tuple[int, int]]) -> AttentionMap:
        x, queries = self.first_item(x, queries)
        x = self.pad(x)
        _, H, W, _ = x.shape
        S, m = self.n_win, self.num_heads
        h, w = H // S, W // S
        q, k, v = self.qkv(x)
        q_reg, k_reg = self.regions(q), self.regions(k)
        r_idx = self.route(q_reg.mean(2), k_reg.mean(2))[0]  # (S^2, topk)
        # flat token id of every (region, slot) on the padded grid
        tok = torch.arange(H * W, device=x.device).view(1, H, W, 1)
        tok_reg = self.regions(tok)[0, :, :, 0]  # (S^2, w2)
        weights = x.new_zeros(len(queries), m, H * W)
        routed = []
        for i, (y, xx) in enumerate(queries):
            region = (y // h) * S + xx // w
            slot = (y % h) * w + xx % w
            keys = tok_reg[r_idx[region]].flatten()  # (topk*w2,), in the order gather uses
            qi = self.heads(q_reg[0, region, slot : slot + 1])  # (m, 1, c)
            ki = self.heads(k_reg[0, r_idx[region]].flatten(0, 1))  # (m, topk*w2, c)
            probs = ((qi * self.scale) @ ki.transpose(-2, -1)).softmax(-1)[:, 0]  # (m, topk*w2)
            weights[i].index_add_(1, keys, probs)
            routed.append(r_idx[region].tolist())
        values = v[0].view(H, W, m, self.dim // m).permute(2, 0, 1, 3)
        lepe = self.lepe_term(v)[0]
        offset = torch.stack([lepe[y, xx] for y, xx in queries])  # added before wo, outside the attention
        pattern = {"regions": routed, "n_win": S, "region_size": (h, w), "padded_size": (H, W)}
        grid = Mark("grid", ([r * h for r in range(1, S)], [c * w for c in range(1, S)]))
        marks = [[grid] + [Mark("box", (r // S * h, r % S * w, (r // S + 1) * h, (r % S + 1) * w)) for r in regions]
                 for regions in routed]
        return AttentionMap(queries, weights.view(len(queries), m, H, W), values, pattern, marks, offset=offset)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, n_win={self.n_win}, topk={self.topk}, qk_dim={self.qk_dim}, "
            f"side_dwconv={self.side_dwconv}, auto_pad={self.auto_pad}, impl={self.impl}"
        )
