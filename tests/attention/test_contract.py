"""What every registered mechanism promises, built-in or plugin: checked over the registry,
so a new mechanism is tested the moment it registers."""

import pytest
import torch

from attnbench import build_attention, list_attentions
from attnbench.attention import attention_info
from attnbench.measure import closed_form_macs, count_macs

ATOL = 1e-5  # fp32, max abs difference
DIM, HEADS = 32, 2


def registry_specs() -> list[str]:
    """Each mechanism at its defaults, and at every other choice of a choice parameter (impl)."""
    specs = []
    for info in list_attentions():
        specs.append(info.name)
        for p in info.params:
            if p.choices:
                specs += [f"{info.name}:{p.name}={c}" for c in p.choices if c != p.default]
    return specs


# settings the defaults leave out: shifted windows, other strides and groups, padding
VARIANTS = [
    "window:window_size=4,shift=2",
    "axial:stripe=2",
    "dilated:window_size=3,dilation=2",
    "dilated:window_size=4,dilation=0",
    "neighborhood:kernel_size=3,dilation=3",
    "neighborhood:kernel_size=3,dilation=3,impl=gather",
    "deformable:stride=2",
    "sra:sr_ratio=3",
    "bra:n_win=3,topk=2",
    "bra:n_win=3,topk=2,impl=gather",
]
SPECS = registry_specs() + VARIANTS


def rand_x(H, W, B=2, C=DIM, seed=0):
    return torch.randn(B, H, W, C, generator=torch.Generator().manual_seed(seed))


def test_the_registry_holds_the_built_ins_and_both_example_plugins():
    names = {info.name for info in list_attentions()}
    built_in = {"full", "window", "axial", "dilated", "neighborhood", "deformable", "sra", "bra"}
    assert built_in <= names
    assert "pooled" in names, "the single-file plugin examples/my_attention.py (tests/conftest.py loads it)"
    assert "linear" in names, "install examples/attnbench-linear (the README's test command does)"
    assert attention_info("linear").source.startswith("attnbench_linear.linear")


@pytest.mark.parametrize("spec", SPECS)
def test_forward_keeps_the_shape(spec):
    torch.manual_seed(0)
    x = rand_x(11, 13)
    y = build_attention(spec, DIM, HEADS)(x)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()


@pytest.mark.parametrize("spec", SPECS)
def test_a_batch_equals_its_items_one_by_one(spec):
    """Batch items never mix: groups, masks, routing and samples are per item (11x13 pads every pattern)."""
    torch.manual_seed(0)
    m = build_attention(spec, DIM, HEADS)
    x = rand_x(11, 13, B=3)
    with torch.no_grad():
        together = m(x)
        alone = torch.cat([m(x[i : i + 1]) for i in range(3)])
    assert (together - alone).abs().max().item() <= ATOL


@pytest.mark.parametrize("spec", SPECS)
def test_a_permuted_input_view_gives_the_same_output(spec):
    """An NCHW tensor permuted to (B, H, W, C) is a non-contiguous view; it must work as is."""
    torch.manual_seed(0)
    m = build_attention(spec, DIM, HEADS)
    x = torch.randn(2, DIM, 11, 13).permute(0, 2, 3, 1)
    with torch.no_grad():
        assert (m(x) - m(x.contiguous())).abs().max().item() <= ATOL


@pytest.mark.parametrize("spec", SPECS)
def test_backward_gives_finite_gradients_to_every_parameter(spec):
    torch.manual_seed(0)
    m = build_attention(spec, DIM, HEADS)
    x = rand_x(11, 13).requires_grad_(True)
    (m(x) * torch.randn(2, 11, 13, DIM)).sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in m.named_parameters():
        assert p.grad is not None, f"{spec}: {name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{spec}: {name} has non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{spec}: {name} has an all-zero gradient"


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("H,W", [(12, 12), (11, 13)])
def test_the_map_rebuilds_the_output(spec, H, W):
    """weights x values (+ offset) is, for each chosen query, the input of the module's output projection."""
    torch.manual_seed(0)
    m = build_attention(spec, DIM, HEADS)
    if m.output_projection is None:
        pytest.skip(f"{spec} names no output projection")
    x = rand_x(H, W, B=1)
    queries = [(0, 0), (H - 1, W - 1), (H // 2, W // 3), (1, W - 2)]
    captured = {}
    proj = m.get_submodule(m.output_projection)
    hook = proj.register_forward_pre_hook(lambda mod, args: captured.__setitem__("in", args[0]))
    with torch.no_grad():
        m(x)
    hook.remove()
    amap = m.attention_map(x, queries)
    mixed = torch.einsum("qhyx,hyxd->qhd", amap.weights, amap.values).flatten(1)  # (Q, C)
    if amap.offset is not None:
        mixed = mixed + amap.offset
    for i, (y, xx) in enumerate(queries):
        diff = (mixed[i] - captured["in"][0][y, xx]).abs().max().item()
        assert diff <= ATOL, f"{spec} query {(y, xx)}: {diff}"
    sums = amap.weights.flatten(2).sum(-1)  # a distribution per query and head
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    assert len(amap.marks) in (0, len(queries))
    for marks in amap.marks:
        assert all(mark.kind in ("box", "points", "grid") for mark in marks)


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("H,W", [(16, 16), (11, 13)])
def test_the_declared_closed_form_equals_the_counted_macs(spec, H, W):
    name = spec.partition(":")[0]
    if attention_info(name).macs is None:
        pytest.skip(f"{name} declares no closed form")
    B = 2
    counted = count_macs(build_attention(spec, DIM, HEADS), rand_x(H, W, B=B)).total
    assert counted == closed_form_macs(spec, B, H, W, DIM, HEADS)


@pytest.mark.parametrize("name", [info.name for info in list_attentions()])
def test_bad_parameters_are_refused_naming_the_parameter(name):
    info = attention_info(name)
    checked = 0
    for p in info.params:
        if p.choices:
            bad = "no-such-choice"
        elif p.low is not None and p.kind in (int, float):
            bad = p.kind(p.low - 1)
        else:
            continue
        with pytest.raises(ValueError) as err:
            build_attention(name, DIM, HEADS, **{p.name: bad})
        assert p.name in str(err.value) and str(bad) in str(err.value)
        checked += 1
    with pytest.raises(ValueError, match="unknown parameter 'no_such_parameter'"):
        build_attention(name, DIM, HEADS, no_such_parameter=1)
    if info.params:
        assert checked, f"{name}: no parameter with a range or choices to check"


@pytest.mark.parametrize("name", [info.name for info in list_attentions()])
def test_a_wrong_input_shape_names_the_expected_shape(name):
    m = build_attention(name, 64, 2)
    for bad in (torch.randn(2, 64, 16, 16)[:, :, :, :5], torch.randn(16, 16, 64)):
        with pytest.raises(ValueError, match=r"\(B, H, W, C\) with C = 64"):
            m(bad)


@pytest.mark.parametrize("name", [info.name for info in list_attentions()])
def test_declared_settings_build(name):
    """The demo settings viz draws and the baseline implementation are real settings."""
    info = attention_info(name)
    build_attention(name, DIM, HEADS, **info.demo)
    build_attention(name, DIM, HEADS, **info.baseline)
    assert info.description
    for p in info.params:
        assert p.help and p.allowed()


def _compiled_calls(spec: str, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager and compiled (fullgraph, dynamo's eager backend: the graph capture without the
    code generation) outputs of two calls at one shape; a graph break or a recompile raises."""
    import torch._dynamo

    torch.manual_seed(0)
    module = build_attention(spec, DIM, HEADS)
    x = rand_x(12, 12)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True), torch.set_grad_enabled(grad):
        for _ in range(2):
            got = compiled(x.clone().requires_grad_(grad))
            if grad:
                got.sum().backward()
        want = module(x)
    return got.detach(), want.detach()


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwdbwd"])
@pytest.mark.parametrize("spec", [s for s in SPECS if attention_info(s.split(":")[0]).compiles])
def test_a_mechanism_that_says_it_compiles_is_one_graph_without_recompiles(spec, grad):
    got, want = _compiled_calls(spec, grad)
    assert torch.allclose(got, want, atol=ATOL, rtol=0), (got - want).abs().max()


def test_every_built_in_says_it_compiles():
    built_in = [i for i in list_attentions() if i.source.startswith("attnbench.attention")]
    assert len(built_in) == 8 and all(i.compiles for i in built_in), [i.name for i in built_in if not i.compiles]
