"""pack / unpack against the reference bit stream, for every width and odd sizes."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from alphaquant import ops, reference as ref

SIZES = [1, 7, 8, 17, 1025]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("k", SIZES)
def test_pack_matches_reference_and_round_trips(bits, k, device):
    codes = torch.randint(0, 2**bits, (3, k), dtype=torch.uint8)
    packed = ops.pack(codes.to(device), bits)
    assert packed.shape == (3, (k * bits + 7) // 8)
    assert torch.equal(packed.cpu(), ref.pack(codes, bits))
    assert torch.equal(ops.unpack(packed, bits, k).cpu(), codes)


def test_documented_layouts():
    # formats.h: 4-bit low nibble first; 6-bit four codes in three bytes.
    assert ops.pack(torch.tensor([[0x1, 0x2]], dtype=torch.uint8), 4).tolist() == [[0x21]]
    c = torch.tensor([[0b000001, 0b000010, 0b000011, 0b000100]], dtype=torch.uint8)
    b = ops.pack(c, 6)[0].tolist()
    assert b == [0b10_000001, 0b0011_0000, 0b000100_00]
    assert ops.pack(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).tolist() == [[0b00_11_10_01]]


def test_pack_non_contiguous_and_batched(device):
    codes = torch.randint(0, 16, (4, 5, 9), dtype=torch.uint8, device=device)
    view = codes.transpose(0, 1)
    assert torch.equal(ops.pack(view, 4).cpu(), ref.pack(view.cpu().contiguous(), 4))


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 4), k=st.integers(1, 300), seed=st.integers(0, 2**31))
def test_pack_round_trip_fuzz(bits, rows, k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, k), dtype=torch.uint8, generator=g)
    assert torch.equal(ops.unpack(ops.pack(codes, bits), bits, k), codes)
