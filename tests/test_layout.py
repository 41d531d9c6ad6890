"""alphaquant.layout, the one Python home of the group layout, against plain loops."""
import pytest
import torch

from alphaquant import layout, ops


@pytest.mark.parametrize("k", [1, 7, 8, 64, 65, 130])
@pytest.mark.parametrize("group_size", [-1, 0, 1, 8, 32, 64, 200])
def test_groups_scales_and_sums_match_loops(k, group_size):
    x = torch.randn(3, k)
    shape = layout.scale_shape(x.shape, group_size)
    # what the kernels produce
    _, scale, _ = ops.quantize(x, "int8", group_size=group_size)
    assert tuple(scale.shape) == shape
    if group_size == -1:
        expected = x.sum().reshape(1, 1)
    else:
        g = k if group_size <= 0 or group_size >= k else group_size
        assert layout.num_groups(k, group_size) == -(-k // g) and layout.group_length(k, group_size) == g
        expected = torch.stack([torch.stack([x[r, s:s + g].sum() for s in range(0, k, g)]) for r in range(3)])
    assert torch.allclose(layout.group_sums(x, group_size), expected, atol=1e-5)
    grouped = layout.to_groups(x, group_size)
    assert torch.equal(grouped[~grouped.isnan()], x.flatten())


def test_granularity_names():
    assert [layout.op_group_size(g, 32) for g in layout.GRANULARITIES] == [-1, 0, 32]
    with pytest.raises(ValueError, match="granularity must be one of"):
        layout.op_group_size("per_row", 32)
    for bad in (-2, 1.5, True):
        with pytest.raises(ValueError, match="group_size must be"):
            layout.check_op_group_size(bad)
