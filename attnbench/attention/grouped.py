"""Attention within groups of tokens: the engine behind full, window, axial and dilated.

Each of those patterns splits the token grid into groups (one group, windows, stripes,
dilated windows) and lets every query attend to the keys of its own group. A
:class:`GroupLayout` says which token sits in which slot of which group; the same layout
drives the forward pass (fused SDPA over all groups at once) and the attention map, so
the map is the forward's own computation restricted to a few queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .base import AttentionBase, AttentionMap, Mark, box_around, linear_rows, stage


@dataclass
class GroupLayout:
    """``index[g, l]`` is the flat token id (y * W + x) in slot ``l`` of group ``g``, or
    ``N`` for a padding slot. Groups whose queries see every real key of the group come
    first; the rest, from ``clean`` on, carry an additive (G - clean, 1, L, L) ``mask``
    with -inf where a query may not see a key (shifted-window labels, padding)."""

    index: Tensor  # (G, L) long
    inverse: Tensor  # (N,) long: position of each token in index.flatten()
    mask: Tensor | None  # for groups clean.. only
    clean: int  # groups [0, clean) need no mask
    identity: bool = False  # one group holding every token in order (full attention)
    padded: bool = False  # some slots are padding
    # plain numbers, not properties: torch.compile reads a layout's fields as constants
    groups: int = field(init=False)
    size: int = field(init=False)  # slots per group

    def __post_init__(self) -> None:
        self.groups, self.size = self.index.shape

    def to(self, device: torch.device) -> "GroupLayout":
        mask = None if self.mask is None else self.mask.to(device)
        return GroupLayout(self.index.to(device), self.inverse.to(device), mask, self.clean, self.identity, self.padded)

    def mask_rows(self, g: Tensor, slot: Tensor) -> Tensor | None:
        """(Q, 1, L) mask rows of the queries in groups ``g`` at ``slot`` (0 for clean groups)."""
        if self.mask is None:
            return None
        masked = g >= self.clean
        rows = self.mask[(g - self.clean).clamp(min=0), :, slot]  # (Q, 1, L)
        return torch.where(masked[:, None, None], rows, torch.zeros_like(rows))


def layout_from_slots(index: Tensor, num_tokens: int, extra_mask: Tensor | None = None) -> GroupLayout:
    """Finish a layout from its (G, L) index: groups reordered clean first, the inverse
    map, and a mask that keeps real queries off padding keys (padding queries may see
    padding, so no row is all -inf) and applies ``extra_mask`` (G, L, L; True = blocked)."""
    pad = index == num_tokens
    if bool(pad.any()) or extra_mask is not None:
        blocked = pad[:, None, :] & ~pad[:, :, None]  # (G, Lq, Lk)
        if extra_mask is not None:
            blocked = blocked | extra_mask
    else:  # nothing to mask; never build G x L x L (L = N for full attention)
        blocked = torch.zeros(index.shape[0], 1, 1, dtype=torch.bool)
    needs_mask = blocked.flatten(1).any(1)
    order = torch.argsort(needs_mask.int(), stable=True)  # clean groups first, order kept
    index, blocked = index[order], blocked[order]
    clean = int((~needs_mask).sum())
    mask = None
    if clean < index.shape[0]:
        mask = torch.zeros(blocked[clean:].shape).masked_fill_(blocked[clean:], float("-inf"))[:, None]
    flat = index.flatten()
    inverse = torch.empty(num_tokens, dtype=torch.long)
    real = flat < num_tokens
    inverse[flat[real]] = torch.arange(flat.numel())[real]
    identity = index.shape[0] == 1 and index.shape[1] == num_tokens and bool((flat == torch.arange(num_tokens)).all())
    return GroupLayout(index, inverse, mask, clean, identity, bool(pad.any()))


def padded_token_ids(H: int, W: int, Hp: int, Wp: int) -> Tensor:
    """(Hp, Wp) grid of flat token ids, the bottom/right padding marked with H * W."""
    ids = torch.full((Hp, Wp), H * W, dtype=torch.long)
    ids[:H, :W] = torch.arange(H * W).view(H, W)
    return ids


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def ceil_div(n: int, m: int) -> int:
    return -(-n // m)


def partition(x: Tensor, layout: GroupLayout) -> Tensor:
    """Tokens (B, N, C) -> groups (G*B, L, C), group-major with the batch inside, so that
    the clean groups are the first ``clean * B`` rows; padding slots are zero tokens.

    The input is grouped before the projections, not q, k and v after them: one copy of
    C channels instead of three, and the projections then write each group's q, k, v
    where SDPA reads them (a head-split view, no transpose copy). A padding slot's
    q, k, v are the projection biases; the mask keeps them from every real query."""
    B, N, C = x.shape
    if layout.identity:
        return x  # one group: (B, N, C) is (G*B, L, C) already
    if layout.padded:
        x = torch.cat([x, x.new_zeros(B, 1, C)], dim=1)
    return x[:, layout.index].transpose(0, 1).reshape(-1, layout.size, C)  # a copy; a view for B = 1


def merge(out: Tensor, layout: GroupLayout) -> Tensor:
    """Attention output (G*B, h, L, d) -> tokens (B, N, h*d), the inverse of :func:`partition`."""
    GB, h, L, d = out.shape
    B = GB // layout.groups
    if layout.identity:
        return out.transpose(1, 2).reshape(B, L, h * d)
    out = out.view(layout.groups, B, h, L, d).permute(1, 0, 3, 2, 4).reshape(B, -1, h * d)
    return out[:, layout.inverse]


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
    """q, k, v: (G*B, h, L, d) as :func:`partition` orders the groups -> (G*B, h, L, d).
    ``bias``: an additive (1, h, L, L) bias for every group (relative positions), or None.
    Clean groups and masked groups run as two calls, so the mask is only materialised,
    and only slows the kernel, where it is needed."""
    if layout.mask is None:
        return attend(q, k, v, bias, scale, impl)
    B = q.shape[0] // layout.groups
    c = layout.clean * B
    mask = layout.mask.to(q.dtype)  # (G - clean, 1, L, L)
    mask = mask.repeat_interleave(B, dim=0) if B > 1 else mask
    mask = mask if bias is None else bias + mask
    masked = attend(q[c:], k[c:], v[c:], mask, scale, impl)
    return torch.cat([attend(q[:c], k[:c], v[:c], bias, scale, impl), masked]) if c else masked


def grouped_rows(q: Tensor, k: Tensor, layout: GroupLayout, bias: Tensor | None, scale: float, tokens: Tensor) -> Tensor:
    """Softmax weights of the queries ``tokens`` over all N keys: (Q, h, N).

    q, k: (N, h, d) for one batch item. The logits are those :func:`attend` computes for
    the same rows: (q * scale) . k + bias + mask.
    """
    N, h, _ = q.shape
    pos = layout.inverse[tokens]
    g, slot = pos // layout.size, pos % layout.size
    keys = layout.index[g]  # (Q, L)
    k_pad = torch.cat([k, k.new_zeros(1, *k.shape[1:])])
    logits = q.new_empty(len(tokens), h, layout.size)
    for group in g.unique():  # a group's keys once for all its queries, not copied out per query
        rows = (g == group).nonzero().squeeze(1)
        logits[rows] = torch.einsum("qhd,lhd->qhl", q[tokens[rows]] * scale, k_pad[layout.index[group]])
    if bias is not None:
        logits = logits + bias[0, :, slot, :].transpose(0, 1)  # (Q, h, L)
    mask = layout.mask_rows(g, slot)
    if mask is not None:
        logits = logits + mask
    probs = logits.softmax(-1)
    out = probs.new_zeros(len(tokens), h, N + 1)
    out.scatter_add_(2, keys[:, None, :].expand(-1, h, -1), probs)
    return out[..., :N]


def visible_keys(layout: GroupLayout, tokens: Tensor) -> list[list[int]]:
    """For each query token, the ids of the real tokens its mask lets it see."""
    N = layout.inverse.numel()
    pos = layout.inverse[tokens]
    g, slot = pos // layout.size, pos % layout.size
    keys = layout.index[g]  # (Q, L)
    seen = keys < N
    mask = layout.mask_rows(g, slot)
    if mask is not None:
        seen &= mask[:, 0] == 0
    return [k[s].tolist() for k, s in zip(keys, seen)]


class GroupedAttention(AttentionBase):
    """qkv Linear, attention within groups, proj Linear (timm's key names).

    Subclasses give :meth:`branches`: the head ranges and the layout each uses (one
    branch for most patterns, two for axial stripes), and may add a learned bias.
    ``branch_marks`` says how ``bench viz`` draws each branch's group for a query: ``box``,
    ``dashed box`` or ``points`` (nothing for a branch without an entry).
    """

    impl = "sdpa"
    output_projection = "proj"
    projections = {"qkv": "qkv"}
    branch_marks: tuple[str, ...] = ()

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__(dim, num_heads)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self._layouts: dict[tuple, list[tuple[slice, GroupLayout]]] = {}

    def build_branches(self, H: int, W: int) -> list[tuple[slice, GroupLayout]]:
        raise NotImplementedError

    @torch.compiler.assume_constant_result  # built from the shape alone: a constant to torch.compile
    def branches(self, H: int, W: int, device: torch.device) -> list[tuple[slice, GroupLayout]]:
        H, W = int(H), int(W)  # plain ints, also while fvcore traces
        key = (H, W, str(device))
        if key not in self._layouts:
            with torch.inference_mode(False):  # the cache must serve autograd too
                self._layouts[key] = [(heads, lay.to(device)) for heads, lay in self.build_branches(H, W)]
        return self._layouts[key]

    def learned_bias(self, branch: int) -> Tensor | None:
        """An additive (1, heads, L, L) bias from parameters (relative position bias)."""
        return None

    def project(self, x: Tensor, heads: slice) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v of the heads ``heads`` for tokens x (..., C): (..., h, d) each, each from
        its own rows of the one qkv Linear (timm's state dict), so each is contiguous."""
        C, d = self.dim, self.head_dim
        rows = [slice(part * C + heads.start * d, part * C + heads.stop * d) for part in range(3)]
        q, k, v = (t.unflatten(-1, (-1, d)) for t in linear_rows(x, self.qkv, rows))
        return q, k, v

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        B, H, W, C = x.shape
        tokens = x.reshape(B, H * W, C)
        outs = []
        for i, (heads, layout) in enumerate(self.branches(H, W, x.device)):
            with stage("partition"):
                groups = partition(tokens, layout)  # (G*B, L, C)
            with stage("qkv"):
                q, k, v = (t.transpose(1, 2) for t in self.project(groups, heads))  # (G*B, h, L, d) views
            with stage("bias"):
                bias = self.learned_bias(i)
                bias = None if bias is None else bias.to(q.dtype)
            with stage("attention"):
                out = grouped_attention(q, k, v, layout, bias, self.scale, self.impl)
            del q, k, v, groups  # free them before the merge makes its copies
            with stage("merge"):
                outs.append(merge(out, layout))  # (B, N, h*d)
        with stage("proj"):
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
            return self.proj(out.view(B, H, W, C))

    def token_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = (t.transpose(0, 1) for t in self.project(x[0].flatten(0, 1), slice(0, self.num_heads)))
        return q * self.scale, k, v

    @torch.no_grad()
    def attention_map(self, x: Tensor, queries: Sequence[tuple[int, int]]) -> AttentionMap:
        x, queries = self.first_item(x, queries)
        H, W = x.shape[1:3]
        q, k, v = (t[0].flatten(0, 1) for t in self.project(x, slice(0, self.num_heads)))  # (N, h, d)
        tokens = self.query_ids(queries, W, x.device)
        rows, groups = [], []
        for i, (heads, layout) in enumerate(self.branches(H, W, x.device)):
            bias = self.learned_bias(i)
            rows.append(grouped_rows(q[:, heads], k[:, heads], layout, bias, self.scale, tokens))
            groups.append(visible_keys(layout, tokens))
        weights = torch.cat(rows, dim=1).view(len(queries), self.num_heads, H, W)
        values = v.view(H, W, self.num_heads, self.head_dim).permute(2, 0, 1, 3)
        marks = [[self._mark(kind, ids[i], W) for kind, ids in zip(self.branch_marks, groups)] for i in range(len(queries))]
        # per branch, per query: the token ids it may attend (its window, stripe, ...)
        return AttentionMap(queries, weights, values, {"groups": groups}, marks)

    @staticmethod
    def _mark(kind: str, ids: list[int], W: int) -> Mark:
        if kind == "points":
            return Mark("points", [(i // W, i % W) for i in ids])
        return box_around(ids, W, dashed=kind == "dashed box")
