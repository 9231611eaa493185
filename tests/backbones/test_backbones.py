"""Whole networks: BiFormer-T/S/B and BiFormer-STL reproduce the official code (parameters,
fvcore MACs at 224, state-dict keys and shapes, recorded from it in tests/data), Swin-T/S/B
reproduce timm (parameters, MACs, logits on the same weights), and the STL network takes
any mechanism."""

import json

import pytest
import torch

import attnbench
from attnbench.attention import list_attentions
from attnbench.backbones import build_model, list_models, model_info
from attnbench.measure.flops import count_macs
from conftest import TESTS

OFFICIAL = json.loads((TESTS / "data" / "biformer_official.json").read_text())["models"]
NAMED = ["biformer_t", "biformer_s", "biformer_b", "biformer_stl", "swin_t", "swin_s", "swin_b"]


def test_the_named_models_are_registered():
    assert [info.name for info in list_models()] == NAMED
    assert attnbench.build_model is build_model


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMED)
def test_parameters_and_macs_at_224_equal_the_reference(name):
    info = model_info(name)
    model = build_model(name).eval()
    assert sum(p.numel() for p in model.parameters()) == info.params
    macs = count_macs(model, torch.randn(1, 3, 224, 224))
    assert macs.total == info.macs_224
    if name in OFFICIAL:  # the registered figures are the ones counted from the official code
        assert (info.params, info.macs_224) == (OFFICIAL[name]["params"], OFFICIAL[name]["macs_224"])


@pytest.mark.parametrize("name", ["biformer_t", "biformer_s", "biformer_b", "biformer_stl"])
def test_biformer_keys_and_shapes_are_the_official_ones(name):
    model = build_model(name)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == OFFICIAL[name]["keys"]


def test_an_official_biformer_state_dict_loads_and_drives_the_output():
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(shape, generator=g) * 0.05 if shape else torch.tensor(1))
             for k, shape in OFFICIAL["biformer_t"]["keys"].items()}
    for k in state:
        if k.endswith("running_var"):
            state[k] = state[k].abs() + 1.0
    model = build_model("biformer_t").eval()
    model.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 224, 224, generator=g)
    with torch.no_grad():
        before = model(x)
        model.head.bias += 1.0
        after = model(x)
    torch.testing.assert_close(after - before, torch.ones_like(before), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name, timm_name", [("swin_t", "swin_tiny_patch4_window7_224"),
                                              ("swin_s", "swin_small_patch4_window7_224"),
                                              ("swin_b", "swin_base_patch4_window7_224")])
def test_swin_logits_equal_timms_on_the_same_weights(name, timm_name):
    """timm's state dict loads as is; with every weight drawn at random (so the relative
    position bias, the norms and the patch-merging order all matter), the logits agree
    within 1e-4 of their scale."""
    timm = pytest.importorskip("timm", reason="timm (with a torchvision that matches torch) is a test dependency")
    reference = timm.create_model(timm_name, pretrained=False).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else 0.05) + (1.0 if p.dim() == 1 else 0.0))
    model = build_model(name).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224, generator=g)
    with torch.no_grad():
        expected, got = reference(x), model(x)
    scale = expected.abs().max().item()
    assert scale > 1e-2
    assert (got - expected).abs().max().item() <= 1e-4 * max(scale, 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMED)
@pytest.mark.parametrize("size", [(160, 288), (230, 230)])
def test_non_square_and_padded_inputs_run(name, size):
    """160x288: stage maps of 40x72 ... 5x9, which neither n_win 7 nor window 7 divides;
    230x230: sides that are no multiple of 32, so later maps have odd sides."""
    model = build_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


@pytest.mark.slow
@pytest.mark.parametrize("info", list_attentions(), ids=lambda i: i.name)
def test_the_stl_network_takes_every_mechanism(info):
    # axial stripes split the heads in two: 96 / 32 = 3 heads will not do, 96 / 48 = 2 will
    overrides = {"head_dim": 48} if info.name == "axial" else {}
    model = build_model(f"stl:{info.name}", num_classes=10, **overrides).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    kinds = {type(b.attn).__name__ for stage in model.stages[:3] for b in stage.blocks}
    assert len(kinds) == 1 and getattr(model.stages[0].blocks[0].attn, "mechanism", None) == info.name


def test_stl_follows_the_papers_per_stage_settings_unless_the_spec_sets_them():
    bra = build_model("stl:bra")
    assert [stage.blocks[0].attn.topk for stage in bra.stages[:3]] == [1, 4, 16]
    assert [stage.blocks[0].attn.topk for stage in build_model("stl:bra:topk=2").stages[:3]] == [2, 2, 2]
    window = build_model("stl:window:window_size=7")
    assert [b.attn.shift for b in window.stages[2].blocks] == [0, 3, 0, 3, 0, 3]
    assert {b.attn.shift for b in build_model("stl:window:window_size=7,shift=0").stages[2].blocks} == {0}
    assert type(bra.stages[3].blocks[0].attn).__name__ == "LePEAttention"


def test_dense_prediction_settings_go_in_as_overrides():
    model = build_model("biformer_t", n_win=8).eval()
    assert {b.attn.n_win for stage in model.stages[:3] for b in stage} == {8}
    with torch.no_grad():
        assert model(torch.randn(1, 3, 256, 512)).shape == (1, 1000)


@pytest.mark.parametrize("call, words", [
    (lambda: build_model("resnet50"), ["unknown model 'resnet50'", "biformer_t", "stl:SPEC"]),
    (lambda: build_model("stl:"), ["stl: needs a mechanism spec"]),
    (lambda: build_model("stl:nope"), ["nope"]),
    (lambda: build_model("stl:bra:topk=99"), ["topk"]),
    (lambda: build_model("stl:axial"), ["stage 1 of the STL network", "3 heads", "head_dim=48"]),
    (lambda: build_model("swin_t", n_win=8), ["swin_t", "n_win"]),
    (lambda: build_model("swin_t")(torch.randn(1, 224, 224)), ["(B, 3, H, W)"]),
])
def test_bad_input_is_named(call, words):
    with pytest.raises(ValueError) as err:
        call()
    for w in words:
        assert w in str(err.value)


# -- where the MACs go --------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["biformer_t", "swin_t", "biformer_stl"])
def test_the_mac_breakdown_sums_to_the_total(name):
    from attnbench.measure.model import macs_breakdown

    b = macs_breakdown(build_model(name).eval(), torch.randn(1, 3, 224, 224))
    assert b.total == model_info(name).macs_224
    assert sum(b.by_component.values()) == b.total
    assert sum(sum(stage.values()) for stage in b.by_stage.values()) == b.total
    assert set(b.by_stage) == {"1", "2", "3", "4", "head"}


@pytest.mark.slow
def test_the_breakdown_puts_each_part_where_the_closed_forms_say():
    from attnbench.measure.model import macs_breakdown
    from attnbench.measure import closed_form_macs

    bif = macs_breakdown(build_model("biformer_t").eval(), torch.randn(1, 3, 224, 224))
    # stage 1: 2 blocks on 56 x 56 tokens, dim 64, 2 heads; BRA topk 1, MLP ratio 3
    assert bif.by_stage["1"]["attention"] == 2 * closed_form_macs("bra:n_win=7,topk=1", 1, 56, 56, 64, 2)
    assert bif.by_stage["1"]["mlp"] == 2 * 56 * 56 * (64 * 192 * 2)
    swin = macs_breakdown(build_model("swin_t").eval(), torch.randn(1, 3, 224, 224))
    assert swin.by_stage["1"]["attention"] == 2 * closed_form_macs("window:window_size=7", 1, 56, 56, 96, 3)
    assert swin.by_stage["2"]["other"] == 28 * 28 * (4 * 96) * 192  # patch merging's Linear
