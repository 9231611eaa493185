"""Closed-form MAC counts from the papers, for checking what fvcore counts.

N = H * W tokens, C = dim. Padded grids (written Np) count the padded tokens that a
mechanism computes on; for divisible sizes every formula reduces to the paper's:

- full       4NC^2 + 2N^2C                                  (Swin, Eq. 1)
- window     3Np C^2 + NC^2 + 2M^2 Np C                     (Swin, Eq. 2: 4NC^2 + 2M^2 NC)
- axial      3/2 (Np_h + Np_v) C^2 + NC^2 + (Np_h sw W + Np_v sw H) C
                                                            (CSWin, Sec. 3.4: HWC(4C + sw H + sw W))
- dilated    3Np C^2 + NC^2 + 2k^2 Np C                     (as W-MSA, on dilated windows)
  (q, k and v are projected on the padded groups, as timm's Swin pads before its qkv;
  the output projection runs on the N real tokens)
- deformable 2N Ns C + 2NC^2 + 2Ns C^2 + (k^2 + 2) Ns C      (DAT, Sec. 3.3; Ns = Hk Wk samples)
             + 9 Ns C  (fvcore's convention for the offset net's LayerNorm, 5 per value, and
             the bilinear sampling, 4 per value; the paper leaves both out)
- bra        Np C (2 qk + C) + Np C^2 + S^4 qk + Np (k Np / S^2)(qk + C) + Np C K^2
             (BiFormer: qkv, wo, region routing, token attention, lepe; with qk = C this is
             4NC^2 + S^4 C + 2N(kN/S^2)C + NCK^2)

Counts exclude softmax, the region means, masking and other ops without multiply-adds.
"""

from __future__ import annotations

from typing import Any, Callable

from ..attention import attention_info, parse_spec


def _ceil(n: int, m: int) -> int:
    return -(-n // m)


def _full(N: int, H: int, W: int, C: int, heads: int, p: dict) -> int:
    return 4 * N * C * C + 2 * N * N * C


def _window(N, H, W, C, heads, p):
    M = p["window_size"]
    Np = _ceil(H, M) * M * _ceil(W, M) * M
    return 3 * Np * C * C + N * C * C + 2 * M * M * Np * C


def _axial(N, H, W, C, heads, p):
    sh, sw = min(p["stripe"], H), min(p["stripe"], W)
    Np_h, Np_v = _ceil(H, sh) * sh * W, _ceil(W, sw) * sw * H  # each half's padded tokens
    qkv = 3 * (Np_h + Np_v) * C * (C // 2)  # each half projects its C/2 channels of q, k, v
    attention = (Np_h * sh * W + Np_v * sw * H) * C  # each half: 2 * queries * stripe keys * C/2
    return qkv + N * C * C + attention


def _dilated(N, H, W, C, heads, p):
    k, d = p["window_size"], p["dilation"]
    dy, dx = (d, d) if d else (_ceil(H, k), _ceil(W, k))  # 0: MaxViT grid
    Np = _ceil(H, k * dy) * k * dy * _ceil(W, k * dx) * k * dx
    return 3 * Np * C * C + N * C * C + 2 * k * k * Np * C


def _deformable(N, H, W, C, heads, p):
    r, k = p["stride"], p["kernel"]
    Ns = _ceil(H, r) * _ceil(W, r)
    paper = 2 * N * Ns * C + 2 * N * C * C + 2 * Ns * C * C + (k * k + 2) * Ns * C
    return paper + 9 * Ns * C


def _bra(N, H, W, C, heads, p):
    S, k, K = p["n_win"], p["topk"], p["side_dwconv"]
    qk = p["qk_dim"] or C
    Hp, Wp = (_ceil(H, S) * S, _ceil(W, S) * S) if p["auto_pad"] else (H, W)
    Np = Hp * Wp
    return Np * C * (2 * qk + C) + Np * C * C + S**4 * qk + Np * (k * Np // (S * S)) * (qk + C) + Np * C * K * K


CLOSED_FORMS: dict[str, Callable[..., int]] = {
    "full": _full,
    "window": _window,
    "axial": _axial,
    "dilated": _dilated,
    "deformable": _deformable,
    "bra": _bra,
}


def closed_form_macs(spec: str, batch: int, height: int, width: int, dim: int, heads: int, **params: Any) -> int:
    """Forward MACs of ``spec`` on a (batch, height, width, dim) input, from the paper's formula."""
    name, spec_params = parse_spec(spec)
    resolved = attention_info(name).resolve({**spec_params, **params})
    return batch * CLOSED_FORMS[name](height * width, height, width, dim, heads, resolved)
