"""Every named backbone compiles as one graph and does not recompile at a fixed shape."""

import pytest

from attnbench.backbones import build_model
from attnbench.sweep.presets import NAMED_MODELS

ATOL = 1e-4  # fp32 logits of a whole network, max abs difference


@pytest.mark.slow
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwdbwd"])
@pytest.mark.parametrize("name", NAMED_MODELS + ("stl:bra:n_win=7,topk=4",))
def test_a_backbone_is_one_graph_without_recompiles(name, grad):
    import torch
    import torch._dynamo

    torch.manual_seed(0)
    model = build_model(name).train(grad)
    images = torch.randn(1, 3, 200, 328)  # not a multiple of the windows: the padding paths too
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # the capture, without code generation
    with torch._dynamo.config.patch(error_on_recompile=True), torch.set_grad_enabled(grad):
        for _ in range(2):
            got = compiled(images)
            if grad:
                got.sum().backward()
        want = model(images)
    assert torch.allclose(got, want, atol=ATOL, rtol=0), (got - want).abs().max()
