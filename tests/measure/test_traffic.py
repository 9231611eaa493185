"""The bytes a call moves (attnbench.measure.traffic): the traffic side of the roofline."""

import torch
import torch.nn as nn

from attnbench import build_attention
from attnbench.measure.traffic import bytes_by_module, bytes_moved, tensor_bytes

F32 = 4


def test_a_matmul_reads_both_operands_and_writes_its_product_once():
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    assert bytes_moved(lambda: a @ b) == (64 * 32 + 32 * 16 + 64 * 16) * F32


def test_views_move_nothing_and_a_copy_moves_its_tensor_twice():
    x = torch.randn(8, 16, 32)
    assert bytes_moved(lambda: x.transpose(0, 2)[1:].unsqueeze(0)) == 0
    assert bytes_moved(lambda: x.transpose(0, 2).contiguous()) == 2 * x.numel() * F32


def test_an_expanded_dimension_counts_once():
    row = torch.randn(1, 100)
    assert tensor_bytes(row.expand(50, 100)) == 100 * F32
    assert bytes_moved(lambda: row.expand(50, 100) + 1.0) == (100 + 50 * 100) * F32


def test_backward_is_counted_with_the_forward():
    module = build_attention("window:window_size=4", 32, 2)
    x = torch.randn(1, 16, 16, 32)
    with torch.inference_mode():
        forward = bytes_moved(lambda: module(x))
    y = x.clone().requires_grad_()
    both = bytes_moved(lambda: module(y).sum().backward())
    assert forward > 2 * x.numel() * F32 and both > 2 * forward


def test_bytes_by_module_split_the_call_where_the_modules_run():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(4, 16)
    with torch.inference_mode():
        total, parts = bytes_by_module(lambda: model(x), {"0": model[0], "2": model[2]})
    # addmm reads bias, input and weight, writes the output
    assert parts == {"0": (32 + 4 * 16 + 16 * 32 + 4 * 32) * F32, "2": (8 + 4 * 32 + 32 * 8 + 4 * 8) * F32}
    assert total == parts["0"] + parts["2"] + 2 * 4 * 32 * F32  # and the ReLU between them
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks  # the hooks are gone afterwards


def test_op_costs_time_each_op_kind_and_count_its_flops_as_fvcore_counts_macs():
    from attnbench.measure import count_macs
    from attnbench.measure.traffic import op_costs

    module = build_attention("window:window_size=4", 32, 2)
    x = torch.randn(1, 16, 16, 32)
    with torch.inference_mode():
        module(x)  # its shape's layout built, outside the counted calls
        found = op_costs(lambda: module(x))
    names = [c.name for c in found]
    assert len(names) == len(set(names)) and {"linear", "scaled_dot_product_attention"} <= set(names)
    assert all(c.calls >= 1 and c.seconds > 0 for c in found)
    assert sum(c.flops for c in found) == 2 * count_macs(module, x).total  # 2 FLOPs a MAC, every MAC
    with torch.inference_mode():
        assert sum(c.bytes for c in found) == bytes_moved(lambda: module(x))


def test_an_op_is_bound_by_the_longer_of_its_flops_and_its_bytes():
    from attnbench.measure.traffic import OpCost

    assert OpCost("mm", flops=200 * 10**9, bytes=10**9).bound_s(100.0, 10.0) == 2.0  # compute: 2 s against 0.1 s
    assert OpCost("copy", flops=0, bytes=10**9).bound_s(100.0, 10.0) == 0.1


def test_a_batched_matmul_seen_whole_counts_its_flops():
    from attnbench.measure.traffic import op_costs

    a, b = torch.randn(3, 5, 7), torch.randn(7, 4)
    with torch.inference_mode():
        (cost,) = [c for c in op_costs(lambda: torch.matmul(a, b)) if c.flops]
    assert cost.flops == 2 * 3 * 5 * 4 * 7
