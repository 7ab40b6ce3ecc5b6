"""Specification of ``deepep_plugin.fp8``: per-token, per-128-channel FP8 casts and UE8M0 packing.

Round-trip bound used throughout (``_assert_round_trip``): E4M3 keeps 3 mantissa bits, so rounding a normal
scaled value ``v = x / s`` moves it by at most half an ulp, ``2**-4 * |v|``; below the smallest normal (``2**-6``)
the step is ``2**-9``, so at most ``2**-10``. Multiplying back by ``s`` gives
``|dequant(x) - x| <= 2**-4 * |x| + 2**-10 * s`` per element, plus a few float32 roundings (covered by a
``1e-4`` relative slack). This is four times tighter than ``2**-3`` of the value and is what E4M3 promises.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepep_plugin.errors import DeepEPInputError
from deepep_plugin.fp8 import (
    FP8_E4M3_MAX,
    FP8_GROUP,
    pack_ue8m0,
    per_token_cast_back,
    per_token_cast_to_fp8,
    unpack_ue8m0,
)

FLOOR32 = torch.tensor(1e-4, dtype=torch.float32).item()  # the amax floor as float32 stores it


def _random_rows(gen: torch.Generator, tokens: int, hidden: int, dtype: torch.dtype, spread: float = 4.0):
    """Normal values with a different magnitude per row (10**U(-spread, spread)) and some all-zero groups."""
    x = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64)
    x *= 10.0 ** ((torch.rand(tokens, 1, generator=gen, dtype=torch.float64) * 2 - 1) * spread)
    if tokens and hidden >= 2 * FP8_GROUP:
        x[0, FP8_GROUP:2 * FP8_GROUP] = 0.0
    return x.to(dtype)


def _amax64(x: torch.Tensor) -> torch.Tensor:
    groups = x.double().reshape(*x.shape[:-1], -1, FP8_GROUP)
    return groups.abs().amax(dim=-1).clamp_min(FLOOR32)


def _ceil_pow2_64(v: torch.Tensor) -> torch.Tensor:
    """2 ** ceil(log2(v)) in float64, exact via frexp (v = m * 2**e with m in [0.5, 1))."""
    mantissa, exponent = torch.frexp(v)
    return torch.ldexp(torch.ones_like(v), torch.where(mantissa == 0.5, exponent - 1, exponent))


def _assert_round_trip(x: torch.Tensor, x_fp8: torch.Tensor, scales32: torch.Tensor) -> None:
    back = per_token_cast_back(x_fp8, scales32, dtype=torch.float32).double()
    x64 = x.double()
    s = scales32.double().repeat_interleave(FP8_GROUP, dim=-1)
    bound = (2.0**-4 * x64.abs() + 2.0**-10 * s) * (1 + 1e-4)
    err = (back - x64).abs()
    assert bool((err <= bound).all()), f"worst excess {(err - bound).max().item()}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_default_scale_is_amax_over_448(dtype):
    gen = torch.Generator().manual_seed(1)
    x = _random_rows(gen, 37, 7 * FP8_GROUP, dtype, spread=2.0 if dtype == torch.float16 else 4.0)
    _, scales = per_token_cast_to_fp8(x)
    assert scales.dtype == torch.float32 and scales.shape == (37, 7)
    # amax is a float32 value, so float64 division rounded once to float32 is the correctly rounded quotient.
    expected = (_amax64(x) / FP8_E4M3_MAX).float()
    assert torch.equal(scales, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_default_data_is_saturated_x_times_448_over_amax(dtype):
    gen = torch.Generator().manual_seed(2)
    x = _random_rows(gen, 19, 3 * FP8_GROUP, dtype)
    x_fp8, _ = per_token_cast_to_fp8(x)
    amax = x.float().reshape(19, 3, FP8_GROUP).abs().amax(-1).clamp_min(1e-4)
    inverse = (FP8_E4M3_MAX / amax.double()).float().unsqueeze(-1)  # the correctly rounded float32 448 / amax
    expected = (x.float().reshape(19, 3, FP8_GROUP) * inverse).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(x_fp8.view(torch.uint8), expected.view(19, -1).view(torch.uint8))


@pytest.mark.parametrize("round_scale", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip_within_e4m3_precision(dtype, round_scale):
    gen = torch.Generator().manual_seed(3)
    x = _random_rows(gen, 64, 5 * FP8_GROUP, dtype, spread=2.0 if dtype == torch.float16 else 4.0)
    x_fp8, scales = per_token_cast_to_fp8(x, round_scale=round_scale)
    assert x_fp8.dtype == torch.float8_e4m3fn and x_fp8.shape == x.shape
    _assert_round_trip(x, x_fp8, scales)


def test_round_scale_is_smallest_power_of_two_not_below_amax_over_448():
    gen = torch.Generator().manual_seed(4)
    x = _random_rows(gen, 50, 4 * FP8_GROUP, torch.float32, spread=6.0)
    _, scales = per_token_cast_to_fp8(x, round_scale=True)
    ratio = _amax64(x) / FP8_E4M3_MAX
    mantissa, _ = torch.frexp(scales.double())
    assert bool((mantissa == 0.5).all()), "every scale must be a power of two"
    assert bool((scales.double() >= ratio).all()) and bool((scales.double() < 2 * ratio).all())
    assert torch.equal(scales.double(), _ceil_pow2_64(ratio))


def test_round_scale_at_exact_powers_of_two_and_just_above():
    # amax = 448 * 2**k gives exactly 2**k; the next float32 above gives 2**(k+1).
    k = torch.tensor([-10, -3, 0, 1, 7], dtype=torch.float64)
    exact = (FP8_E4M3_MAX * 2.0**k).float()
    above = torch.nextafter(exact, torch.tensor(float("inf")))
    x = torch.zeros(2, len(k) * FP8_GROUP)
    x.view(2, len(k), FP8_GROUP)[0, :, 5] = exact
    x.view(2, len(k), FP8_GROUP)[1, :, 9] = -above
    x_fp8, scales = per_token_cast_to_fp8(x, round_scale=True)
    assert torch.equal(scales[0].double(), 2.0**k)
    assert torch.equal(scales[1].double(), 2.0 ** (k + 1))
    # The amax element lands on +-448 and +-224 respectively.
    assert torch.equal(x_fp8.view(2, len(k), FP8_GROUP)[0, :, 5].float(), torch.full((len(k),), 448.0))
    assert torch.equal(x_fp8.view(2, len(k), FP8_GROUP)[1, :, 9].float(), torch.full((len(k),), -224.0))


@pytest.mark.parametrize("round_scale", [False, True])
def test_never_saturates_beyond_448_and_amax_maps_to_top(round_scale):
    gen = torch.Generator().manual_seed(5)
    x = _random_rows(gen, 33, 6 * FP8_GROUP, torch.float32, spread=8.0)
    x_fp8, _ = per_token_cast_to_fp8(x, round_scale=round_scale)
    q = x_fp8.float()
    assert bool(q.isfinite().all()) and q.abs().max().item() <= FP8_E4M3_MAX
    if not round_scale:
        # The largest element of every group above the amax floor is scaled to exactly 448; below the floor
        # the group keeps its magnitude relative to 1e-4.
        top = q.abs().reshape(33, 6, FP8_GROUP).amax(-1)
        above_floor = x.reshape(33, 6, FP8_GROUP).abs().amax(-1) >= FLOOR32
        assert bool(above_floor.any()) and bool((~above_floor).any())
        assert bool((top[above_floor] == FP8_E4M3_MAX).all())
        assert bool((top[~above_floor] < FP8_E4M3_MAX).all())


def test_cast_rounds_just_above_448_down_to_448():
    # The default cast relies on this instead of a clamp pass: 448 * (1 + 2**-24)**2 is its worst case.
    just_above = torch.tensor([448.0 * (1 + 2.0**-22), -448.0 * (1 + 2.0**-22), 463.0], dtype=torch.float32)
    assert just_above[0] > 448
    assert just_above.to(torch.float8_e4m3fn).float().tolist() == [448.0, -448.0, 448.0]


@pytest.mark.parametrize("round_scale", [False, True])
def test_all_zero_rows_use_amax_floor_and_stay_finite(round_scale):
    x = torch.zeros(3, 2 * FP8_GROUP, dtype=torch.bfloat16)
    x_fp8, scales = per_token_cast_to_fp8(x, round_scale=round_scale)
    expected = torch.tensor(FLOOR32 / FP8_E4M3_MAX, dtype=torch.float64)
    if round_scale:
        expected = _ceil_pow2_64(expected)
    assert torch.equal(scales, expected.float().expand(3, 2))
    assert torch.equal(x_fp8.float(), torch.zeros(3, 2 * FP8_GROUP))
    back = per_token_cast_back(x_fp8, scales)
    assert torch.equal(back, torch.zeros_like(x))


def test_extreme_float32_magnitudes_stay_finite():
    x = torch.tensor([1e-30, -3e-20, 1e30, -2e35], dtype=torch.float32).repeat_interleave(FP8_GROUP).view(1, -1)
    for round_scale in (False, True):
        x_fp8, scales = per_token_cast_to_fp8(x, round_scale=round_scale)
        assert bool(x_fp8.float().isfinite().all()) and bool(scales.isfinite().all())
        assert bool((scales > 0).all())
        _assert_round_trip(x, x_fp8, scales)


def test_ue8m0_byte_layout_matches_hand_built_example():
    # Row 0: exponents 127, 126, 130, 120 | 137, 107, pad 127, pad 127.
    # Row 1: exponents 126, 127, 120, 130 | 127, 127, pad 127, pad 127 (top byte >= 128: negative int32).
    scales = torch.tensor(
        [[2.0**0, 2.0**-1, 2.0**3, 2.0**-7, 2.0**10, 2.0**-20], [2.0**-1, 2.0**0, 2.0**-7, 2.0**3, 1.0, 1.0]]
    )
    packed = pack_ue8m0(scales)
    expected_unsigned = [[0x78827E7F, 0x7F7F6B89], [0x82787F7E, 0x7F7F7F7F]]
    expected = torch.tensor([[v - 2**32 if v >= 2**31 else v for v in row] for row in expected_unsigned])
    assert packed.dtype == torch.int32 and packed.shape == (2, 2)
    assert torch.equal(packed, expected.to(torch.int32))
    # On a little-endian host the memory bytes are the exponents in group order.
    assert packed.view(torch.uint8).tolist() == [
        [127, 126, 130, 120, 137, 107, 127, 127],
        [126, 127, 120, 130, 127, 127, 127, 127],
    ]


@pytest.mark.parametrize("num_groups", [1, 3, 4, 5, 8, 9])
def test_pack_unpack_round_trip(num_groups):
    gen = torch.Generator().manual_seed(6)
    exponents = torch.randint(-126, 128, (2, 7, num_groups), generator=gen)
    scales = torch.ldexp(torch.ones(2, 7, num_groups, dtype=torch.float64), exponents).float()
    packed = pack_ue8m0(scales)
    assert packed.shape == (2, 7, -(-num_groups // 4))
    assert torch.equal(unpack_ue8m0(packed, num_groups), scales)


def test_ue8m0_cast_packs_the_round_scale_cast():
    gen = torch.Generator().manual_seed(7)
    x = _random_rows(gen, 21, 10 * FP8_GROUP, torch.bfloat16)
    x_fp8, scales = per_token_cast_to_fp8(x, round_scale=True)
    x_fp8_ue, packed = per_token_cast_to_fp8(x, round_scale=True, use_ue8m0=True)
    assert packed.dtype == torch.int32 and packed.shape == (21, 3)
    assert torch.equal(x_fp8_ue.view(torch.uint8), x_fp8.view(torch.uint8))
    assert torch.equal(packed, pack_ue8m0(scales))
    assert torch.equal(per_token_cast_back(x_fp8_ue, packed), per_token_cast_back(x_fp8, scales))


def test_cast_back_is_product_rounded_once():
    gen = torch.Generator().manual_seed(8)
    x = _random_rows(gen, 9, 2 * FP8_GROUP, torch.float32)
    x_fp8, scales = per_token_cast_to_fp8(x)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        expected = (x_fp8.float().view(9, 2, FP8_GROUP) * scales.unsqueeze(-1)).view(9, -1).to(dtype)
        assert torch.equal(per_token_cast_back(x_fp8, scales, dtype=dtype), expected)


def test_three_dim_input_equals_flattened_tokens():
    gen = torch.Generator().manual_seed(9)
    x = _random_rows(gen, 4 * 6, 5 * FP8_GROUP, torch.bfloat16).view(4, 6, -1)
    for round_scale, use_ue8m0 in ((False, False), (True, False), (True, True)):
        x_fp8, scales = per_token_cast_to_fp8(x, round_scale, use_ue8m0)
        flat_fp8, flat_scales = per_token_cast_to_fp8(x.view(24, -1), round_scale, use_ue8m0)
        assert x_fp8.shape == x.shape and scales.shape == (4, 6, flat_scales.size(-1))
        assert torch.equal(x_fp8.view(24, -1).view(torch.uint8), flat_fp8.view(torch.uint8))
        assert torch.equal(scales.view(24, -1), flat_scales)
        assert torch.equal(per_token_cast_back(x_fp8, scales).view(24, -1), per_token_cast_back(flat_fp8, flat_scales))


def test_zero_tokens():
    x = torch.zeros(0, 4 * FP8_GROUP, dtype=torch.bfloat16)
    x_fp8, scales = per_token_cast_to_fp8(x, round_scale=True, use_ue8m0=True)
    assert x_fp8.shape == (0, 4 * FP8_GROUP) and scales.shape == (0, 1)
    assert per_token_cast_back(x_fp8, scales).shape == (0, 4 * FP8_GROUP)


def test_non_contiguous_input():
    gen = torch.Generator().manual_seed(10)
    x = _random_rows(gen, 2 * FP8_GROUP, 12, torch.float32).t()  # [12, 256], transposed view
    x_fp8, scales = per_token_cast_to_fp8(x)
    ref_fp8, ref_scales = per_token_cast_to_fp8(x.contiguous())
    assert torch.equal(x_fp8.view(torch.uint8), ref_fp8.view(torch.uint8)) and torch.equal(scales, ref_scales)


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(0, 6),
    num_groups=st.integers(1, 6),
    log10_magnitude=st.floats(-25.0, 25.0),
    round_scale=st.booleans(),
    use_ue8m0=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_round_trip_and_range(tokens, num_groups, log10_magnitude, round_scale, use_ue8m0, seed):
    use_ue8m0 = use_ue8m0 and round_scale
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, num_groups * FP8_GROUP, generator=gen, dtype=torch.float64) * 10.0**log10_magnitude)
    x = x.float()
    x_fp8, scales = per_token_cast_to_fp8(x, round_scale=round_scale, use_ue8m0=use_ue8m0)
    q = x_fp8.float()
    assert bool(q.isfinite().all()) and (q.numel() == 0 or q.abs().max().item() <= FP8_E4M3_MAX)
    scales32 = unpack_ue8m0(scales, num_groups) if use_ue8m0 else scales
    assert bool(scales32.isfinite().all()) and bool((scales32 > 0).all())
    _assert_round_trip(x, x_fp8, scales32)


# ----------------------------------------------------------------------------------------------- bad input


def test_hidden_not_multiple_of_128_names_x_and_shape():
    with pytest.raises(DeepEPInputError, match=r"x .*\(4, 200\)"):
        per_token_cast_to_fp8(torch.zeros(4, 200, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, torch.float8_e4m3fn])
def test_wrong_input_dtype(dtype):
    with pytest.raises(DeepEPInputError, match="x must be bfloat16, float16 or float32"):
        per_token_cast_to_fp8(torch.zeros(2, 128).to(dtype))


@pytest.mark.parametrize("shape", [(128,), (1, 1, 2, 128)])
def test_wrong_input_ndim(shape):
    with pytest.raises(DeepEPInputError, match="x must be 2-D"):
        per_token_cast_to_fp8(torch.zeros(shape, dtype=torch.bfloat16))


def test_ue8m0_requires_round_scale():
    with pytest.raises(DeepEPInputError, match="use_ue8m0"):
        per_token_cast_to_fp8(torch.zeros(2, 128, dtype=torch.bfloat16), round_scale=False, use_ue8m0=True)


def test_cast_back_rejects_bad_arguments():
    x_fp8, scales = per_token_cast_to_fp8(torch.randn(3, 640))
    with pytest.raises(DeepEPInputError, match="x_fp8 must be torch.float8_e4m3fn"):
        per_token_cast_back(x_fp8.float(), scales)
    with pytest.raises(DeepEPInputError, match=r"scales \(float32\) must have shape \(3, 5\)"):
        per_token_cast_back(x_fp8, scales[:, :4])
    with pytest.raises(DeepEPInputError, match=r"scales \(int32, UE8M0-packed\) must have shape \(3, 2\)"):
        per_token_cast_back(x_fp8, torch.zeros(3, 5, dtype=torch.int32))
    with pytest.raises(DeepEPInputError, match="scales must be float32 or UE8M0-packed int32"):
        per_token_cast_back(x_fp8, scales.double())
    with pytest.raises(DeepEPInputError, match="x_fp8 must have a hidden size"):
        per_token_cast_back(x_fp8[:, :100], scales)
    with pytest.raises(DeepEPInputError, match="dtype must be a floating"):
        per_token_cast_back(x_fp8, scales, dtype=torch.int32)


def test_pack_rejects_non_powers_of_two_and_wrong_dtype():
    with pytest.raises(DeepEPInputError, match="powers of two"):
        pack_ue8m0(torch.tensor([[1.0, 0.75]]))
    with pytest.raises(DeepEPInputError, match="powers of two"):
        pack_ue8m0(torch.tensor([[1.0, -2.0]]))
    with pytest.raises(DeepEPInputError, match="scales must be float32"):
        pack_ue8m0(torch.tensor([[1.0, 2.0]], dtype=torch.float64))


def test_unpack_rejects_mismatched_group_count():
    packed = torch.zeros(2, 3, dtype=torch.int32)
    with pytest.raises(DeepEPInputError, match="num_groups=8 needs 2 packed ints"):
        unpack_ue8m0(packed, 8)
    with pytest.raises(DeepEPInputError, match="packed must be int32"):
        unpack_ue8m0(packed.long(), 12)


# ----------------------------------------------------------------------------------------------- device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("round_scale,use_ue8m0", [(False, False), (True, False), (True, True)])
def test_cuda_gives_the_same_bits_as_cpu(round_scale, use_ue8m0):
    gen = torch.Generator().manual_seed(11)
    x = _random_rows(gen, 4096, 7168 // FP8_GROUP * FP8_GROUP, torch.bfloat16)
    cpu_fp8, cpu_scales = per_token_cast_to_fp8(x, round_scale, use_ue8m0)
    gpu_fp8, gpu_scales = per_token_cast_to_fp8(x.cuda(), round_scale, use_ue8m0)
    assert torch.equal(gpu_fp8.cpu().view(torch.uint8), cpu_fp8.view(torch.uint8))
    assert torch.equal(gpu_scales.cpu(), cpu_scales)
    assert torch.equal(per_token_cast_back(gpu_fp8, gpu_scales).cpu(), per_token_cast_back(cpu_fp8, cpu_scales))
