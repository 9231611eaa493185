"""Neighbourhood attention (NAT, Hassani et al., CVPR 2023; dilation as in DiNAT, 2022).

Each query attends to the k x k tokens around it. Near a border the window slides to stay
inside the map (NATTEN's rule), so every query sees exactly k^2 keys. With dilation d the
neighbours are d apart and come from the query's own residue class (y mod d, x mod d),
the window clamped inside that class; NATTEN's requirement H, W >= k * d holds here too.
NAT's relative position bias, a (2k-1) x (2k-1) table per head (key ``rpb``), is added to
the logits.

Written through the plugin API as a third party would write it: registration,
parameters, closed form and memory estimate are all declared here.

Two implementations, equal to 1e-5 (tests):

- ``impl=tiled`` (the default): queries in T x T tiles; the keys any query of a tile may see
  lie in one (T+k-1) x (T+k-1) halo, so each tile is one fused SDPA call with a mask (and the
  bias) that is the same for every tile of a class (interior, each border): one call per
  class, never an N x N or N x k^2 tensor. Its MACs count the masked halo it computes:
  4NC^2 + 2C T^2 A_y A_x, A = sum over tiles of the halo's length.
- ``impl=gather``: each query's k^2 keys and values copied out (N x k^2 of each), then the
  scores; NAT's own count, 4NC^2 + 2N k^2 C. The baseline the tiled form is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .base import AttentionBase, AttentionMap, Mark, box_around, check_range, linear_rows, stage
from .registry import Param, Shape, register_attention

TILE = 8  # query tile side: 8 x 8 queries see a 14 x 14 halo at k = 7 (4x the k^2 scores, all fused)


def window_start(pos: int, n: int, k: int) -> int:
    """First of the k window positions around ``pos`` on an axis of n (NATTEN's clamping)."""
    return min(max(pos - k // 2, 0), n - k)


def class_sizes(n: int, d: int) -> list[int]:
    """Members of each residue class r = 0..d-1 on an axis of n."""
    return [len(range(r, n, d)) for r in range(d)]


def axis_neighbours(n: int, k: int, d: int) -> Tensor:
    """(n, k): the positions along one axis that each position attends, in window order."""
    sizes = class_sizes(n, d)
    starts = [i % d + d * window_start(i // d, sizes[i % d], k) for i in range(n)]
    return torch.tensor(starts)[:, None] + d * torch.arange(k)


def _halo(n_r: int, k: int) -> int:
    return min(TILE + k - 1, n_r)


def _tiled_area(n: int, k: int, d: int) -> int:
    """Sum over one axis's tiles of their halo length."""
    return sum(-(-n_r // TILE) * _halo(n_r, k) for n_r in class_sizes(n, d))


def neighborhood_macs(s: Shape, p: dict) -> int:
    k, d, C, N = p["kernel_size"], p["dilation"], s.dim, s.tokens
    if p["impl"] == "gather":
        attention = 2 * N * k * k * C
    else:
        attention = 2 * C * TILE**2 * _tiled_area(s.height, k, d) * _tiled_area(s.width, k, d)
    return s.batch * (4 * N * C * C + attention)


def neighborhood_workspace(s: Shape, p: dict) -> int:
    k, d = p["kernel_size"], p["dilation"]
    if p["impl"] == "gather":  # keys and values k^2-fold, scores and probabilities
        return s.batch * s.tokens * k * k * (2 * s.dim + 2 * s.heads) * s.itemsize
    keys = _tiled_area(s.height, k, d) * _tiled_area(s.width, k, d)  # halo keys over all tiles
    return s.batch * 3 * keys * s.dim * s.itemsize


@dataclass
class TileClass:
    """Tiles whose queries see their halo the same way: one SDPA call, one mask."""

    queries: Tensor  # (tiles, T*T) flat token ids (the last real row/column repeated as padding)
    keys: Tensor  # (tiles, Ly*Lx) flat token ids of each tile's halo
    real: Tensor  # (real slots,) long: the query slots that are not padding, in tiles*T*T
    rel: Tensor  # (T*T, Ly*Lx) index into the flattened (2k-1)^2 bias table
    allowed: Tensor  # (T*T, Ly*Lx) bool


def _axis_tiles(n: int, k: int, d: int) -> list[tuple[list[int], list[int], tuple, list[bool]]]:
    """Per tile along one axis: query positions (T, the last real one repeated as padding),
    halo positions (L), the pattern that decides its mask (window starts and offsets
    relative to the halo), and which query slots are real."""
    tiles = []
    for r, n_r in enumerate(class_sizes(n, d)):
        L = _halo(n_r, k)
        for t in range(-(-n_r // TILE)):
            pos = [min(t * TILE + a, n_r - 1) for a in range(TILE)]
            starts = [window_start(p, n_r, k) for p in pos]
            first = min(starts[0], n_r - L)
            pattern = (L, tuple(s - first for s in starts), tuple(first - p for p in pos))
            real = [t * TILE + a < n_r for a in range(TILE)]
            tiles.append(([r + d * p for p in pos], [r + d * (first + i) for i in range(L)], pattern, real))
    return tiles


def _axis_mask(pattern: tuple, k: int) -> tuple[Tensor, Tensor]:
    """(T, L) allowed keys and key-minus-query offsets (in dilated steps) for one axis pattern."""
    L, starts, first_minus_pos = pattern
    local = torch.arange(L)
    starts_t = torch.tensor(starts)[:, None]
    allowed = (local >= starts_t) & (local < starts_t + k)
    rel = local[None, :] + torch.tensor(first_minus_pos)[:, None]
    return allowed, rel


def tile_classes(H: int, W: int, k: int, d: int) -> list[TileClass]:
    rows, cols = _axis_tiles(H, k, d), _axis_tiles(W, k, d)
    groups: dict[tuple, list[tuple]] = {}
    for ry in rows:
        for rx in cols:
            groups.setdefault((ry[2], rx[2]), []).append((ry, rx))
    out = []
    for (py, px), members in groups.items():
        (ay, rely), (ax, relx) = _axis_mask(py, k), _axis_mask(px, k)
        allowed = (ay[:, None, :, None] & ax[None, :, None, :]).flatten(2).flatten(0, 1)
        rel = ((rely + k - 1).clamp(0, 2 * k - 2)[:, None, :, None] * (2 * k - 1)
               + (relx + k - 1).clamp(0, 2 * k - 2)[None, :, None, :]).flatten(2).flatten(0, 1)
        queries, keys, real = [], [], []
        for (qy, ky, _, realy), (qx, kx, _, realx) in members:
            queries.append(torch.tensor(qy)[:, None] * W + torch.tensor(qx)[None, :])
            keys.append(torch.tensor(ky)[:, None] * W + torch.tensor(kx)[None, :])
            real.append(torch.tensor(realy)[:, None] & torch.tensor(realx)[None, :])
        out.append(TileClass(torch.stack(queries).flatten(1), torch.stack(keys).flatten(1),
                             torch.stack(real).flatten().nonzero().flatten(), rel, allowed))
    return out


def neighborhood_rules(shape: Shape | None, p: dict) -> None:
    if p["kernel_size"] % 2 == 0:
        raise ValueError(f"parameter 'kernel_size' = {p['kernel_size']} must be odd")
    if shape:
        check_map_size(shape.height, shape.width, p["kernel_size"], p["dilation"])


def check_map_size(H: int, W: int, k: int, d: int) -> None:
    if H < k * d or W < k * d:
        raise ValueError(f"neighborhood attention with kernel_size {k} and dilation {d} needs a map of at least "
                         f"{k * d}x{k * d} tokens (NATTEN's rule), got {H}x{W}")


@register_attention(
    "neighborhood",
    "NAT neighbourhood attention: each query sees the k x k tokens around it (clamped at borders), dilation d",
    [
        Param("kernel_size", 7, "window side k in tokens (odd)", low=1),
        Param("dilation", 1, "spacing d between neighbours (DiNAT); needs H, W >= k * d", low=1),
        Param("rel_pos_bias", True, "NAT's learned (2k-1)^2 x heads relative position bias"),
        Param("impl", "tiled", "tiled: fused SDPA per class of query tiles over their halo; "
              "gather: each query's k^2 keys copied out, then the scores", choices=("tiled", "gather")),
    ],
    macs=neighborhood_macs,
    workspace_bytes=neighborhood_workspace,
    check=neighborhood_rules,
    baseline={"impl": "gather"},
    compiles=True,
)
class NeighborhoodAttention(AttentionBase):
    output_projection = "proj"
    projections = {"qkv": "qkv"}

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 7, dilation: int = 1, rel_pos_bias: bool = True,
                 impl: str = "tiled") -> None:
        super().__init__(dim, num_heads)
        check_range("kernel_size", kernel_size, 1)
        check_range("dilation", dilation, 1)
        neighborhood_rules(None, {"kernel_size": kernel_size, "dilation": dilation})
        self.kernel_size, self.dilation, self.impl = kernel_size, dilation, impl
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
            nn.init.trunc_normal_(self.rpb, std=0.02)
        else:
            self.rpb = None
        self._cache: dict[tuple, object] = {}

    # -- the neighbourhood, one definition for both implementations and the map ---------------

    @torch.compiler.assume_constant_result  # from the shape alone: a constant to torch.compile
    def neighbours(self, H: int, W: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(N, k^2) flat ids of each token's neighbours, and their index into the bias table."""
        key = ("gather", H, W, str(device))
        if key not in self._cache:
            self._cache[key] = self._build_neighbours(H, W, device)
        return self._cache[key]

    @torch.inference_mode(False)  # the cache must serve autograd too
    def _build_neighbours(self, H: int, W: int, device: torch.device) -> tuple[Tensor, Tensor]:
        k, d = self.kernel_size, self.dilation
        rows, cols = axis_neighbours(H, k, d), axis_neighbours(W, k, d)  # (H, k), (W, k)
        ids = (rows[:, None, :, None] * W + cols[None, :, None, :]).reshape(H * W, k * k)
        dy = (rows - torch.arange(H)[:, None]) // d + k - 1
        dx = (cols - torch.arange(W)[:, None]) // d + k - 1
        rel = (dy[:, None, :, None] * (2 * k - 1) + dx[None, :, None, :]).reshape(H * W, k * k)
        return ids.to(device), rel.to(device)

    @torch.compiler.assume_constant_result  # from the shape alone: a constant to torch.compile
    def classes(self, H: int, W: int, device: torch.device) -> tuple[list[TileClass], Tensor]:
        """The tile classes and, per token, its row in the classes' concatenated real outputs."""
        key = ("tiled", H, W, str(device))
        if key not in self._cache:
            self._cache[key] = self._build_classes(H, W, device)
        return self._cache[key]

    @torch.inference_mode(False)
    def _build_classes(self, H: int, W: int, device: torch.device) -> tuple[list[TileClass], Tensor]:
        classes = tile_classes(H, W, self.kernel_size, self.dilation)
        order = torch.cat([c.queries.flatten()[c.real] for c in classes])
        inverse = torch.empty(H * W, dtype=torch.long)
        inverse[order] = torch.arange(order.numel())
        moved = [TileClass(c.queries.to(device), c.keys.to(device), c.real.to(device), c.rel.to(device),
                           c.allowed.to(device)) for c in classes]
        return moved, inverse.to(device)

    def bias(self, rel: Tensor, dtype: torch.dtype) -> Tensor | None:
        """(heads, *rel.shape) bias from the table, or None without it."""
        if self.rpb is None:
            return None
        return self.rpb.flatten(1)[:, rel].to(dtype)

    # -- forward ---------------------------------------------------------------------------------

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (B, N, C) each from its own rows of the qkv Linear."""
        C = self.dim
        return tuple(t.flatten(1, 2) for t in linear_rows(x, self.qkv, [slice(i * C, (i + 1) * C) for i in range(3)]))

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        B, H, W, C = x.shape
        check_map_size(H, W, self.kernel_size, self.dilation)
        with stage("qkv"):
            q, k, v = self.project(x)
        with stage("attention"):
            out = self.attend_tiled(q, k, v, H, W) if self.impl == "tiled" else self.attend_gather(q, k, v, H, W)
        with stage("proj"):
            return self.proj(out.view(B, H, W, C))

    def heads(self, t: Tensor) -> Tensor:
        """(..., L, C) -> (..., heads, L, head_dim)"""
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2)

    def attend_tiled(self, q: Tensor, k: Tensor, v: Tensor, H: int, W: int) -> Tensor:
        B, N, C = q.shape
        classes, inverse = self.classes(H, W, q.device)
        outs = []
        for c in classes:
            tiles, Tq = c.queries.shape
            # index_select: several times faster than advanced indexing for whole rows on the CPU
            qc = self.heads(q.index_select(1, c.queries.flatten()).view(B * tiles, Tq, C))  # (B*tiles, h, T^2, d)
            kc = self.heads(k.index_select(1, c.keys.flatten()).view(B * tiles, -1, C))  # (B*tiles, h, Ly*Lx, d)
            vc = self.heads(v.index_select(1, c.keys.flatten()).view(B * tiles, -1, C))
            mask = torch.zeros(c.allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~c.allowed, float("-inf"))
            bias = self.bias(c.rel, q.dtype)
            mask = (mask if bias is None else bias + mask).expand(1, self.num_heads, *mask.shape)  # 4-d: the fused CPU kernel
            out = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=self.scale)
            outs.append(out.transpose(1, 2).reshape(B, tiles * Tq, C).index_select(1, c.real))
        return torch.cat(outs, dim=1).index_select(1, inverse)

    def attend_gather(self, q: Tensor, k: Tensor, v: Tensor, H: int, W: int, tokens: Tensor | None = None) -> Tensor:
        """Each query's k^2 neighbours copied out; ``tokens`` restricts the queries (the map)."""
        ids, rel = self.neighbours(H, W, q.device)
        if tokens is not None:
            ids, rel, q = ids[tokens], rel[tokens], q[:, tokens]
        probs = self.neighbour_probs(q, k, ids, rel)  # (B, Q, h, 1, k^2)
        vg = self.heads(v[:, ids])  # (B, Q, h, k^2, d)
        return (probs @ vg).flatten(2)  # matmul, not einsum: fvcore counts einsum from a rounded string

    def neighbour_probs(self, q: Tensor, k: Tensor, ids: Tensor, rel: Tensor) -> Tensor:
        """Softmax weights (B, Q, h, 1, k^2) of queries q (B, Q, C) over their neighbours ``ids``."""
        qh = q.unflatten(-1, (self.num_heads, self.head_dim)).unsqueeze(-2)  # (B, Q, h, 1, d)
        kg = self.heads(k[:, ids])  # (B, Q, h, k^2, d)
        logits = (qh * self.scale) @ kg.transpose(-2, -1)
        bias = self.bias(rel, q.dtype)  # (h, Q, k^2)
        if bias is not None:
            logits = logits + bias.transpose(0, 1).unsqueeze(-2)
        return logits.softmax(-1)

    def token_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = (self.heads(t[0]) for t in self.project(x[:1]))
        return q * self.scale, k, v

    # -- attention map ---------------------------------------------------------------------------

    @torch.no_grad()
    def attention_map(self, x: Tensor, queries: Sequence[tuple[int, int]]) -> AttentionMap:
        x, queries = self.first_item(x, queries)
        _, H, W, C = x.shape
        check_map_size(H, W, self.kernel_size, self.dilation)
        q, k, v = self.project(x)
        tokens = self.query_ids(queries, W, x.device)
        ids, rel = self.neighbours(H, W, x.device)
        probs = self.neighbour_probs(q[:, tokens], k, ids[tokens], rel[tokens])[0, :, :, 0]  # (Q, h, k^2)
        weights = x.new_zeros(len(queries), self.num_heads, H * W)
        weights.scatter_(2, ids[tokens][:, None, :].expand(-1, self.num_heads, -1), probs)
        values = v[0].view(H, W, self.num_heads, self.head_dim).permute(2, 0, 1, 3)
        members = [ids[t].tolist() for t in tokens]
        if self.dilation == 1:
            marks = [[box_around(m, W)] for m in members]
        else:
            marks = [[Mark("points", [(i // W, i % W) for i in m])] for m in members]
        return AttentionMap(queries, weights.view(len(queries), self.num_heads, H, W), values,
                            {"neighbours": members}, marks)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
                f"rel_pos_bias={self.rpb is not None}, impl={self.impl}")
