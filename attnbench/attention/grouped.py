"""Attention within groups of tokens: the engine behind full, window, axial and dilated.

Each of those patterns splits the token grid into groups (one group, windows, stripes,
dilated windows) and lets every query attend to the keys of its own group. A
:class:`GroupLayout` says which token sits in which slot of which group; the same layout
drives the forward pass (one fused SDPA call over all groups) and the attention map, so
the map is the forward's own computation restricted to a few queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .base import AttentionBase, AttentionMap


@dataclass
class GroupLayout:
    """``index[g, l]`` is the flat token id (y * W + x) in slot ``l`` of group ``g``, or
    ``N`` for a padding slot. ``mask`` is an additive (G or 1, 1, L, L) tensor with -inf
    where a query may not see a key, or None when every slot sees every other."""

    index: Tensor  # (G, L) long
    inverse: Tensor  # (N,) long: position of each token in index.flatten()
    mask: Tensor | None
    identity: bool = False  # one group holding every token in order (full attention)

    @property
    def groups(self) -> int:
        return self.index.shape[0]

    @property
    def size(self) -> int:
        return self.index.shape[1]


def layout_from_slots(index: Tensor, num_tokens: int, extra_mask: Tensor | None = None) -> GroupLayout:
    """Finish a layout from its (G, L) index: the inverse map, and a mask that keeps real
    queries off padding keys (padding queries may see padding, so no row is all -inf)."""
    flat = index.flatten()
    inverse = torch.empty(num_tokens, dtype=torch.long)
    real = flat < num_tokens
    inverse[flat[real]] = torch.arange(flat.numel())[real]
    pad = index == num_tokens
    blocked = extra_mask
    if bool(pad.any()):
        blocked = pad[:, None, :] & ~pad[:, :, None]  # (G, Lq, Lk)
        if extra_mask is not None:
            blocked = blocked | extra_mask
    mask = None
    if blocked is not None and bool(blocked.any()):
        mask = torch.zeros(blocked.shape, dtype=torch.float32).masked_fill_(blocked, float("-inf"))[:, None]
    identity = index.shape[0] == 1 and index.shape[1] == num_tokens and bool((flat == torch.arange(num_tokens)).all())
    return GroupLayout(index, inverse, mask, identity)


def padded_token_ids(H: int, W: int, Hp: int, Wp: int) -> Tensor:
    """(Hp, Wp) grid of flat token ids, the bottom/right padding marked with H * W."""
    ids = torch.full((Hp, Wp), H * W, dtype=torch.long)
    ids[:H, :W] = torch.arange(H * W).view(H, W)
    return ids


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _to_groups(t: Tensor, layout: GroupLayout) -> Tensor:
    """(B, N, h, d) -> (G, B*h, L, d), padding slots filled with zeros.

    Groups lead and batch joins the heads so that SDPA gets 4-d inputs (its fused CPU and
    CUDA kernels take nothing else) and a (G, 1, L, L) mask broadcasts without a copy."""
    B, N, h, d = t.shape
    if layout.identity:
        return t.transpose(1, 2)  # (B, h, N, d): the batch is the group axis
    t = torch.cat([t, t.new_zeros(B, 1, h, d)], dim=1)[:, layout.index]  # (B, G, L, h, d)
    return t.permute(1, 0, 3, 2, 4).reshape(layout.groups, B * h, layout.size, d)


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, impl: str) -> Tensor:
    """softmax(q k^T * scale + bias) v over the last two dims."""
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    scores = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1) @ v


def grouped_attention(
    q: Tensor, k: Tensor, v: Tensor, layout: GroupLayout, bias: Tensor | None, scale: float, impl: str = "sdpa"
) -> Tensor:
    """q, k, v: (B, N, h, d) -> (B, N, h, d), each query attending within its group.
    ``bias``: additive, (G or 1, h or 1, L, L)."""
    B, N, h, d = q.shape
    if bias is not None and not layout.identity and B > 1 and bias.shape[1] > 1:
        bias = bias.repeat(1, B, 1, 1)  # per-head bias for every batch item in the B*h axis
    out = attend(_to_groups(q, layout), _to_groups(k, layout), _to_groups(v, layout), bias, scale, impl)
    if layout.identity:
        return out.transpose(1, 2)
    out = out.view(layout.groups, B, h, layout.size, -1).permute(1, 0, 3, 2, 4).reshape(B, -1, h, v.shape[-1])
    return out[:, layout.inverse]


def grouped_rows(q: Tensor, k: Tensor, layout: GroupLayout, bias: Tensor | None, scale: float, tokens: Tensor) -> Tensor:
    """Softmax weights of the queries ``tokens`` over all N keys: (Q, h, N).

    q, k: (N, h, d) for one batch item. The logits are those :func:`attend` computes for
    the same rows: (q * scale) . k + bias.
    """
    N, h, _ = q.shape
    pos = layout.inverse[tokens]
    g, slot = pos // layout.size, pos % layout.size
    keys = layout.index[g]  # (Q, L)
    k_pad = torch.cat([k, k.new_zeros(1, *k.shape[1:])])
    logits = torch.einsum("qhd,qlhd->qhl", q[tokens] * scale, k_pad[keys])
    if bias is not None:
        gb = g if bias.shape[0] > 1 else torch.zeros_like(g)
        logits = logits + bias[gb, :, slot, :]
    probs = logits.softmax(-1)
    out = probs.new_zeros(len(tokens), h, N + 1)
    out.scatter_add_(2, keys[:, None, :].expand(-1, h, -1), probs)
    return out[..., :N]


def visible_keys(layout: GroupLayout, tokens: Tensor) -> list[list[int]]:
    """For each query token, the ids of the real tokens its mask lets it see."""
    N = layout.inverse.numel()
    pos = layout.inverse[tokens]
    g, slot = pos // layout.size, pos % layout.size
    out = []
    for gi, si in zip(g.tolist(), slot.tolist()):
        keys = layout.index[gi]
        seen = keys < N
        if layout.mask is not None:
            seen &= layout.mask[gi if layout.mask.shape[0] > 1 else 0, 0, si] == 0
        out.append(keys[seen].tolist())
    return out


class GroupedAttention(AttentionBase):
    """qkv Linear, attention within groups, proj Linear (timm's key names).

    Subclasses give :meth:`branches`: the head ranges and the layout each uses (one
    branch for most patterns, two for axial stripes), and may add a learned bias.
    """

    impl = "sdpa"

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__(dim, num_heads)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self._layouts: dict[tuple, list[tuple[slice, GroupLayout]]] = {}

    def build_branches(self, H: int, W: int) -> list[tuple[slice, GroupLayout]]:
        raise NotImplementedError

    def branches(self, H: int, W: int, device: torch.device) -> list[tuple[slice, GroupLayout]]:
        H, W = int(H), int(W)  # plain ints, also while fvcore traces
        key = (H, W, str(device))
        if key not in self._layouts:
            with torch.inference_mode(False):  # the cache must serve autograd too
                self._layouts[key] = [
                    (heads, GroupLayout(
                        lay.index.to(device),
                        lay.inverse.to(device),
                        None if lay.mask is None else lay.mask.to(device),
                        lay.identity,
                    ))
                    for heads, lay in self.build_branches(H, W)
                ]
        return self._layouts[key]

    def learned_bias(self, branch: int) -> Tensor | None:
        """An additive (1, heads, L, L) bias from parameters (relative position bias)."""
        return None

    def branch_bias(self, branch: int, layout: GroupLayout, dtype: torch.dtype) -> Tensor | None:
        bias = self.learned_bias(branch)
        if layout.mask is not None:
            bias = layout.mask if bias is None else bias + layout.mask
        return None if bias is None else bias.to(dtype)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, H, W, C = x.shape
        qkv = self.qkv(x).view(B, H * W, 3, self.num_heads, self.head_dim)
        return qkv.unbind(2)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        B, H, W, C = x.shape
        q, k, v = self._qkv(x)
        outs = []
        for i, (heads, layout) in enumerate(self.branches(H, W, x.device)):
            bias = self.branch_bias(i, layout, q.dtype)
            outs.append(grouped_attention(q[:, :, heads], k[:, :, heads], v[:, :, heads], layout, bias, self.scale, self.impl))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return self.proj(out.reshape(B, H, W, C))

    @torch.no_grad()
    def attention_map(self, x: Tensor, queries: Sequence[tuple[int, int]]) -> AttentionMap:
        queries = self.check_queries(x, queries)
        x = x[:1]
        H, W = x.shape[1:3]
        q, k, v = (t[0] for t in self._qkv(x))  # (N, h, d)
        tokens = torch.tensor([y * W + xx for y, xx in queries], device=x.device)
        rows, groups = [], []
        for i, (heads, layout) in enumerate(self.branches(H, W, x.device)):
            bias = self.branch_bias(i, layout, q.dtype)
            rows.append(grouped_rows(q[:, heads], k[:, heads], layout, bias, self.scale, tokens))
            groups.append(visible_keys(layout, tokens))
        weights = torch.cat(rows, dim=1).view(len(queries), self.num_heads, H, W)
        values = v.view(H, W, self.num_heads, self.head_dim).permute(2, 0, 1, 3)
        # per branch, per query: the token ids it may attend (its window, stripe, ...)
        return AttentionMap(queries, weights, values, {"groups": groups})
