import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gift_quant.quant.packing import pack_cols, pack_rows, unpack_cols, unpack_rows


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    k_words=st.integers(1, 6),
    n=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(bits, k_words, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (32 * k_words, n), generator=g, dtype=torch.int32)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (k_words * bits, n)
    assert torch.equal(unpack_rows(packed, bits), codes)
    assert torch.equal(unpack_cols(pack_cols(codes.t(), bits), bits), codes.t())


@pytest.mark.parametrize(
    "bits, word", [(4, 0x77777777), (2, 0x55555555), (3, 0xDB6DB6DB), (8, 0x7F7F7F7F)]
)
def test_v1_symmetric_zero_words_match_gptq_checkpoints(bits, word):
    # GPTQ v1 stores z - 1 = 2**(bits-1) - 1 for every output
    # (docs/FORMAT.md#zero-points-checkpoint_format-v1-and-v2)
    z = torch.full((1, 32), 2 ** (bits - 1) - 1, dtype=torch.int32)
    packed = pack_cols(z, bits)
    assert {int(w) & 0xFFFFFFFF for w in packed.flatten()} == (
        {0xDB6DB6DB, 0x6DB6DB6D, 0xB6DB6DB6} if bits == 3 else {word}
    )
    assert int(packed[0, 0]) & 0xFFFFFFFF == word


def test_three_bit_layout_is_gptq_10_1_10_1_10():
    # value 10 straddles words A/B, value 21 straddles B/C (docs/FORMAT.md#packing-qweight-qzeros)
    codes = torch.zeros(32, 1, dtype=torch.int32)
    codes[10, 0] = 0b111
    codes[21, 0] = 0b101
    words = [int(w) & 0xFFFFFFFF for w in pack_rows(codes, 3)[:, 0]]
    assert words[0] == 0b11 << 30  # bits 0-1 of input 10 at bits 30-31 of A
    assert words[1] == 0b1 | (0b1 << 31)  # bit 2 of input 10 at bit 0; bit 0 of 21 at bit 31
    assert words[2] == 0b10  # bits 1-2 of input 21 at bits 0-1 of C


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="divisible by 32"):
        pack_rows(torch.zeros(30, 4, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="bits must be"):
        pack_rows(torch.zeros(32, 4, dtype=torch.int32), 5)
