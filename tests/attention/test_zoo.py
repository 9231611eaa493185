"""The attention zoo: degenerate cases equal full attention, BRA equals a plain reference,
shifted windows stay inside their window, backward works, and the maps are honest."""

import math

import pytest
import torch
import torch.nn.functional as F

from attnbench import build_attention, format_spec, parse_spec

ATOL = 1e-5  # fp32, max abs difference
DIM, HEADS = 32, 2


def rand_x(H, W, B=2, C=DIM, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, W, C, generator=g)


def share_qkv(full, mech):
    """Copy full's weights into mech (whatever its layer names) and return mech."""
    with torch.no_grad():
        if hasattr(mech, "proj_q"):  # deformable
            wq, wk, wv = full.qkv.weight.chunk(3)
            bq, bk, bv = full.qkv.bias.chunk(3)
            for layer, w, b in ((mech.proj_q, wq, bq), (mech.proj_k, wk, bk), (mech.proj_v, wv, bv)):
                layer.weight.copy_(w)
                layer.bias.copy_(b)
            mech.proj_out.load_state_dict(full.proj.state_dict())
        elif hasattr(mech, "wo"):  # bra
            mech.qkv.qkv.load_state_dict(full.qkv.state_dict())
            mech.wo.load_state_dict(full.proj.state_dict())
        else:
            mech.qkv.load_state_dict(full.qkv.state_dict())
            mech.proj.load_state_dict(full.proj.state_dict())
    return mech


@pytest.mark.parametrize(
    "spec,H,W",
    [
        ("window:window_size=12,rel_pos_bias=false", 12, 12),
        ("window:window_size=16,rel_pos_bias=false", 12, 15),  # one padded window, padding masked
        ("axial:stripe=12", 12, 12),
        ("axial:stripe=40", 9, 14),
        ("dilated:window_size=12,dilation=1", 12, 12),
        ("dilated:window_size=14,dilation=1", 10, 14),
        ("deformable:stride=1", 12, 12),
        ("deformable:stride=1,groups=2", 7, 11),
        ("bra:n_win=4,topk=16,side_dwconv=0", 12, 12),
    ],
)
def test_degenerate_cases_equal_full(spec, H, W):
    torch.manual_seed(0)
    full = build_attention("full", DIM, HEADS)
    mech = share_qkv(full, build_attention(spec, DIM, HEADS))
    if spec.startswith("deformable"):
        with torch.no_grad():
            mech.conv_offset[-1].weight.zero_()  # zero offsets
    mech.scale = full.scale  # BRA scales by qk_dim^-0.5; the degenerate case uses the same scale
    x = rand_x(H, W)
    diff = (mech(x) - full(x)).abs().max().item()
    assert diff <= ATOL, f"{spec}: max abs difference {diff}"


def test_naive_full_equals_sdpa():
    torch.manual_seed(0)
    a = build_attention("full", DIM, HEADS)
    b = build_attention("full:impl=naive", DIM, HEADS)
    b.load_state_dict(a.state_dict())
    x = rand_x(9, 13)
    assert (a(x) - b(x)).abs().max().item() <= ATOL


def test_degenerate_check_is_sensitive():
    """A real (non-degenerate) window does differ from full attention."""
    torch.manual_seed(0)
    full = build_attention("full", DIM, HEADS)
    mech = share_qkv(full, build_attention("window:window_size=4,rel_pos_bias=false", DIM, HEADS))
    x = rand_x(12, 12)
    assert (mech(x) - full(x)).abs().max().item() > 1e-3


# -- BRA against a plain reference ---------------------------------------------------------


def bra_reference(m, x):
    """BRA written plainly from its definition: loops over regions and heads, explicit
    token lists, no gather on expanded views."""
    B, H_in, W_in, C = x.shape
    S, k, qk = m.n_win, m.topk, m.qk_dim
    Hp, Wp = math.ceil(H_in / S) * S, math.ceil(W_in / S) * S
    xp = torch.zeros(B, Hp, Wp, C)
    xp[:, :H_in, :W_in] = x
    proj = xp @ m.qkv.qkv.weight.t() + m.qkv.qkv.bias
    q, kk, v = proj[..., :qk], proj[..., qk : 2 * qk], proj[..., 2 * qk :]
    h, w = Hp // S, Wp // S
    region_tokens = []  # row-major regions, row-major tokens
    for ry in range(S):
        for rx in range(S):
            region_tokens.append([(ry * h + i, rx * w + j) for i in range(h) for j in range(w)])
    scale = qk**-0.5
    out = torch.zeros(B, Hp, Wp, C)
    heads = m.num_heads
    dq, dv = qk // heads, C // heads
    for b in range(B):
        q_r = torch.stack([torch.stack([q[b, y, xx] for y, xx in toks]).mean(0) for toks in region_tokens])
        k_r = torch.stack([torch.stack([kk[b, y, xx] for y, xx in toks]).mean(0) for toks in region_tokens])
        affinity = (q_r * scale) @ k_r.t()
        for r, toks in enumerate(region_tokens):
            routed = torch.topk(affinity[r], k).indices.tolist()
            keys = [t for rr in routed for t in region_tokens[rr]]
            K = torch.stack([kk[b, y, xx] for y, xx in keys])
            V = torch.stack([v[b, y, xx] for y, xx in keys])
            for y, xx in toks:
                for hd in range(heads):
                    qh = q[b, y, xx, hd * dq : (hd + 1) * dq]
                    a = ((qh * scale) @ K[:, hd * dq : (hd + 1) * dq].t()).softmax(-1)
                    out[b, y, xx, hd * dv : (hd + 1) * dv] = a @ V[:, hd * dv : (hd + 1) * dv]
    if m.lepe is not None:
        lepe = F.conv2d(v.permute(0, 3, 1, 2), m.lepe.weight, m.lepe.bias, padding=m.side_dwconv // 2, groups=C)
        out = out + lepe.permute(0, 2, 3, 1)
    out = out @ m.wo.weight.t() + m.wo.bias
    return out[:, :H_in, :W_in]


@pytest.mark.parametrize(
    "H,W,params",
    [
        (16, 16, dict(n_win=4, topk=3)),
        (30, 45, dict(n_win=8, topk=4)),  # padded to 32 x 48
        (13, 10, dict(n_win=3, topk=2, side_dwconv=3, qk_dim=16)),
    ],
)
@pytest.mark.parametrize("impl", ["sdpa", "gather"])
def test_bra_equals_reference(H, W, params, impl):
    torch.manual_seed(0)
    m = build_attention("bra", DIM, HEADS, impl=impl, **params)
    x = rand_x(H, W, B=1)
    diff = (m(x) - bra_reference(m, x)).abs().max().item()
    assert diff <= ATOL, diff


@pytest.mark.parametrize("H,W,n_win,topk", [(64, 64, 8, 4), (30, 45, 8, 16), (17, 9, 4, 1), (12, 12, 3, 9)])
def test_fast_bra_equals_gather(H, W, n_win, topk):
    torch.manual_seed(0)
    gather = build_attention("bra", DIM, HEADS, n_win=n_win, topk=topk, impl="gather")
    fast = build_attention("bra", DIM, HEADS, n_win=n_win, topk=topk, impl="sdpa")
    fast.load_state_dict(gather.state_dict())
    x = rand_x(H, W)
    assert (fast(x) - gather(x)).abs().max().item() <= ATOL


def test_bra_state_dict_keys_are_biformers():
    m = build_attention("bra", DIM, HEADS)
    assert set(m.state_dict()) == {"qkv.qkv.weight", "qkv.qkv.bias", "wo.weight", "wo.bias", "lepe.weight", "lepe.bias"}


def test_window_state_dict_keys_are_swins():
    m = build_attention("window:window_size=7", DIM, HEADS)
    assert set(m.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "relative_position_bias_table"}
    assert m.relative_position_bias_table.shape == (13 * 13, HEADS)
    # an original Swin state dict also carries the index buffer: it loads strictly
    sd = dict(m.state_dict(), relative_position_index=torch.zeros(49, 49, dtype=torch.long))
    build_attention("window:window_size=7", DIM, HEADS).load_state_dict(sd)


def test_window_relative_position_index_matches_swin_definition():
    m = build_attention("window:window_size=3", DIM, HEADS)
    idx = m.relative_position_index
    # query (0,0) to key (2,2): dy=-2, dx=-2 -> (0, 0) after +M-1 -> index 0
    assert idx[0, 8] == 0
    assert idx[8, 0] == (2 * 3 - 1) ** 2 - 1  # dy=+2, dx=+2
    assert idx[4, 4] == (3 - 1) * (2 * 3 - 1) + (3 - 1)  # zero offset, the table's centre


# -- shifted windows -------------------------------------------------------------------------


@pytest.mark.parametrize("H,W", [(16, 16), (14, 19)])
def test_shifted_window_gradient_is_zero_outside_the_window(H, W):
    torch.manual_seed(0)
    M, s = 8, 4
    m = build_attention("window", DIM, HEADS, window_size=M, shift=s)
    x = rand_x(H, W, B=1).requires_grad_(True)
    for y, xx in [(0, 0), (H - 1, W - 1), (H // 2, W // 2), (3, W - 2)]:
        x.grad = None
        m(x)[0, y, xx].sum().backward()
        grad = x.grad[0].abs().sum(-1).flatten()
        amap = m.attention_map(x.detach(), [(y, xx)])
        members = torch.tensor(amap.pattern["groups"][0][0])
        inside = torch.zeros(H * W, dtype=torch.bool)
        inside[members] = True
        assert grad[~inside].max().item() == 0.0
        assert grad[inside].min().item() > 0.0
        # the window really is the shifted one: the members lie in one M x M window of the rolled grid
        ys, xs = members // W, members % W
        ry, rx = (ys - s) % (math.ceil(H / M) * M), (xs - s) % (math.ceil(W / M) * M)
        assert len(set((ry // M).tolist())) == 1 and len(set((rx // M).tolist())) == 1


# -- maps ---------------------------------------------------------------------------------------


def test_map_zero_means_not_attended():
    """Keys with zero map weight do not influence the query's output."""
    torch.manual_seed(0)
    for spec in ["window:window_size=4,shift=2", "axial:stripe=2", "dilated:window_size=3,dilation=2", "bra:n_win=3,topk=2,side_dwconv=0"]:
        m = build_attention(spec, DIM, HEADS)
        x = rand_x(12, 12, B=1).requires_grad_(True)
        amap = m.attention_map(x.detach(), [(5, 6)])
        m(x)[0, 5, 6].sum().backward()
        unattended = (amap.weights[0] == 0).all(0)  # (H, W) over all heads
        if m.mechanism == "bra":
            unattended = unattended[:12, :12]
        assert unattended.any()
        # zero weight -> the key's token moves the output only through q (its own token)
        grad = x.grad[0].abs().sum(-1)
        grad[5, 6] = 0
        assert grad[unattended].max().item() == 0.0, spec


def test_dilation_zero_is_maxvit_grid():
    """dilation=0 on 12x8 with k=4: tokens 3 rows and 2 columns apart, one window per residue."""
    m = build_attention("dilated:window_size=4,dilation=0", DIM, HEADS)
    amap = m.attention_map(rand_x(12, 8, B=1), [(1, 1)])
    keys = sorted(amap.pattern["groups"][0][0])
    assert keys == sorted(y * 8 + x for y in (1, 4, 7, 10) for x in (1, 3, 5, 7))


def test_map_counts_match_patterns():
    m = build_attention("window:window_size=4", DIM, HEADS)
    amap = m.attention_map(rand_x(8, 8, B=1), [(0, 0), (5, 6)])
    assert amap.attended.tolist() == [[16, 16], [16, 16]]
    m = build_attention("axial:stripe=1", DIM, HEADS)
    amap = m.attention_map(rand_x(8, 10, B=1), [(3, 3)])
    assert amap.attended.tolist() == [[10, 8]]  # a row of 10, a column of 8
    m = build_attention("bra:n_win=4,topk=2", DIM, HEADS)
    amap = m.attention_map(rand_x(8, 8, B=1), [(3, 3)])
    assert amap.attended.tolist() == [[8, 8]]  # 2 regions of 2x2 tokens
    assert len(amap.pattern["regions"][0]) == 2


# -- the interface and bad input -----------------------------------------------------------


def test_spec_parses_to_the_same_call():
    name, params = parse_spec("bra:n_win=8,topk=4")
    assert (name, params) == ("bra", {"n_win": 8, "topk": 4})
    torch.manual_seed(0)
    a = build_attention("bra:n_win=8,topk=4", DIM, HEADS)
    torch.manual_seed(0)
    b = build_attention("bra", DIM, HEADS, n_win=8, topk=4)
    assert (a.n_win, a.topk) == (b.n_win, b.topk) == (8, 4)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert format_spec("bra", {"n_win": 8, "topk": 4}) == "bra:n_win=8,topk=4"
    assert parse_spec(format_spec("window", {"rel_pos_bias": False, "shift": 3})) == ("window", {"shift": 3, "rel_pos_bias": False})


@pytest.mark.parametrize(
    "call,words",
    [
        (lambda: build_attention("bra", 64, 2, n_win=4, topk=17), ["topk", "17", "1..16"]),
        (lambda: build_attention("bra", 64, 2, n_win=4, topk=0), ["topk", "0"]),
        (lambda: build_attention("window", 64, 2, window_size=0), ["window_size", "0", ">= 1"]),
        (lambda: build_attention("deformable", 64, 2, stride=0), ["stride", "0", ">= 1"]),
        (lambda: build_attention("dilated", 64, 2, window_size=0), ["window_size", "0"]),
        (lambda: build_attention("full", 64, 3), ["64", "divisible", "3"]),
        (lambda: build_attention("flash", 64, 2), ["unknown", "flash", "full", "window", "bra"]),
        (lambda: build_attention("window", 64, 2, size=7), ["unknown parameter", "size", "window_size", "shift"]),
        (lambda: build_attention("window:window_size=eight", 64, 2), ["window_size", "int", "eight"]),
        (lambda: build_attention("window:window_size", 64, 2), ["key=value"]),
        (lambda: build_attention("window", 64, 2, window_size=8, shift=8), ["shift", "8", "0..7"]),
        (lambda: build_attention("full:impl=flash", 64, 2), ["impl", "sdpa", "naive"]),
        (lambda: build_attention("axial", 64, 1), ["num_heads", "even"]),
    ],
)
def test_bad_parameters_fail_at_construction(call, words):
    with pytest.raises(ValueError) as err:
        call()
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_query_outside_the_grid_fails_clearly():
    m = build_attention("full", DIM, HEADS)
    with pytest.raises(ValueError, match=r"query \(8, 0\) is outside the 8x8"):
        m.attention_map(rand_x(8, 8, B=1), [(8, 0)])


def test_full_and_full_sdpa_are_one_case():
    from attnbench.attention import canonical

    assert canonical("full") == canonical("full:impl=sdpa")
    assert canonical("full").params_text == "impl=sdpa" and canonical("full").label == "full"
    assert canonical("bra:topk=4,n_win=8").label == "bra:n_win=8,topk=4"  # as named, in registration order
    assert canonical("bra:n_win=8").params_text == "n_win=8,topk=4,side_dwconv=5,qk_dim=0,auto_pad=true,impl=sdpa"


# -- neighbourhood attention against a plain reference ----------------------------------------


def natten_start(i, length, k):
    """NATTEN's window start, written as its kernels write it (NS = k // 2)."""
    ns = k // 2
    return max(i - ns, 0) + (i + ns >= length) * (length - i - ns - 1)


def neighborhood_reference(m, x):
    """Every query on its own: its k x k neighbours in its residue class, logits with NAT's
    bias table indexed by the offset, softmax, values; a loop, no tiles, no gathers."""
    B, H, W, C = x.shape
    k, d, h = m.kernel_size, m.dilation, m.num_heads
    hd = C // h
    q, kk, v = (x @ w.t() + b for w, b in zip(m.qkv.weight.chunk(3), m.qkv.bias.chunk(3)))
    out = torch.zeros(B, H, W, C)
    for y in range(H):
        for xx in range(W):
            ry, rx = y % d, xx % d
            ny, nx = len(range(ry, H, d)), len(range(rx, W, d))
            sy, sx = natten_start(y // d, ny, k), natten_start(xx // d, nx, k)
            keys = [(ry + d * (sy + a), rx + d * (sx + b)) for a in range(k) for b in range(k)]
            for hh in range(h):
                sl = slice(hh * hd, (hh + 1) * hd)
                K = torch.stack([kk[:, ky, kx, sl] for ky, kx in keys], 1)  # (B, k^2, hd)
                V = torch.stack([v[:, ky, kx, sl] for ky, kx in keys], 1)
                logits = torch.einsum("bd,bkd->bk", q[:, y, xx, sl] * hd**-0.5, K)
                if m.rpb is not None:
                    logits = logits + torch.stack([m.rpb[hh, (ky - y) // d + k - 1, (kx - xx) // d + k - 1] for ky, kx in keys])
                out[:, y, xx, sl] = torch.einsum("bk,bkd->bd", logits.softmax(-1), V)
    return out @ m.proj.weight.t() + m.proj.bias


@pytest.mark.slow
@pytest.mark.parametrize("H,W,params", [(11, 13, dict(kernel_size=5)), (16, 15, dict(kernel_size=3, dilation=2)),
                                        (9, 9, dict(kernel_size=9)), (12, 10, dict(kernel_size=3, dilation=3))])
@pytest.mark.parametrize("impl", ["tiled", "gather"])
def test_neighborhood_equals_reference(H, W, params, impl):
    torch.manual_seed(0)
    m = build_attention("neighborhood", DIM, HEADS, impl=impl, **params)
    with torch.no_grad():
        m.rpb.normal_()  # a bias that matters, so a wrong index shows
        x = rand_x(H, W)
        diff = (m(x) - neighborhood_reference(m, x)).abs().max().item()
    assert diff <= ATOL, diff


def test_neighborhood_sees_exactly_k_squared_keys_clamped_at_the_border():
    m = build_attention("neighborhood:kernel_size=3", DIM, HEADS)
    amap = m.attention_map(rand_x(6, 7, B=1), [(0, 0), (3, 3), (5, 6)])
    assert amap.attended.tolist() == [[9, 9]] * 3
    assert sorted(amap.pattern["neighbours"][0]) == [0, 1, 2, 7, 8, 9, 14, 15, 16]  # the corner's window slid inside
    with pytest.raises(ValueError, match="at least 14x14 tokens"):
        build_attention("neighborhood:kernel_size=7,dilation=2", DIM, HEADS)(rand_x(13, 20))


# -- spatial-reduction attention against a plain reference -------------------------------------


def sra_reference(m, x):
    """PVT v2 written out: each r x r cell flattened and multiplied by the conv's weight,
    LayerNorm by its definition, then every query against every cell."""
    B, H, W, C = x.shape
    r, h = m.sr_ratio, m.num_heads
    hd = C // h
    if r > 1:
        Hk, Wk = H // r, W // r
        cells = x[:, : Hk * r, : Wk * r].reshape(B, Hk, r, Wk, r, C).permute(0, 1, 3, 5, 2, 4).reshape(B, Hk * Wk, C * r * r)
        red = cells @ m.sr.weight.reshape(C, -1).t() + m.sr.bias
        mu, var = red.mean(-1, keepdim=True), red.var(-1, unbiased=False, keepdim=True)
        red = (red - mu) / torch.sqrt(var + m.norm.eps) * m.norm.weight + m.norm.bias
    else:
        red = x.reshape(B, H * W, C)
    kv = red @ m.kv.weight.t() + m.kv.bias
    k, v = kv[..., :C], kv[..., C:]
    q = (x @ m.q.weight.t() + m.q.bias).reshape(B, H * W, C)
    out = torch.zeros(B, H * W, C)
    for hh in range(h):
        sl = slice(hh * hd, (hh + 1) * hd)
        a = ((q[..., sl] * hd**-0.5) @ k[..., sl].transpose(1, 2)).softmax(-1)
        out[..., sl] = a @ v[..., sl]
    return (out @ m.proj.weight.t() + m.proj.bias).view(B, H, W, C)


@pytest.mark.parametrize("H,W,r", [(16, 16, 4), (11, 13, 3), (9, 7, 1), (8, 8, 8)])
def test_sra_equals_reference(H, W, r):
    torch.manual_seed(0)
    m = build_attention("sra", DIM, HEADS, sr_ratio=r)
    x = rand_x(H, W)
    with torch.no_grad():
        diff = (m(x) - sra_reference(m, x)).abs().max().item()
    assert diff <= ATOL, diff


def test_sra_state_dict_keys_are_pvt_v2s():
    assert set(build_attention("sra:sr_ratio=8", DIM, HEADS).state_dict()) == {
        "q.weight", "q.bias", "kv.weight", "kv.bias", "sr.weight", "sr.bias", "norm.weight", "norm.bias",
        "proj.weight", "proj.bias"}
    assert set(build_attention("sra:sr_ratio=1", DIM, HEADS).state_dict()) == {
        "q.weight", "q.bias", "kv.weight", "kv.bias", "proj.weight", "proj.bias"}


@pytest.mark.parametrize("H,W", [(8, 8), (5, 7)])
def test_a_map_that_is_one_window_is_not_shifted(H, W):
    """Swin (and timm) drop the shift where the map fits in one window: rolling it would only
    cut the window into regions that may not see each other."""
    torch.manual_seed(0)
    shifted = build_attention("window", DIM, HEADS, window_size=8, shift=4)
    plain = build_attention("window", DIM, HEADS, window_size=8, shift=0)
    plain.load_state_dict(shifted.state_dict())
    x = rand_x(H, W, B=1)
    torch.testing.assert_close(shifted(x), plain(x), atol=1e-6, rtol=1e-5)
    larger = rand_x(16, 16, B=1)  # where there are windows to shift, the shift matters
    assert not torch.allclose(shifted(larger), plain(larger))
