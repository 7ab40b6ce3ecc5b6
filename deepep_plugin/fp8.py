"""Per-token, per-128-channel FP8 (E4M3) casts, and the UE8M0 packing of power-of-two scales.

The layout is DeepEP's (interface spec 3.5). A row of ``H`` channels is cut into ``H / 128`` groups of 128
channels; each group gets its own scale:

* ``amax = max(max |x|, 1e-4)`` over the group, in float32 (the floor keeps all-zero groups finite);
* default: the stored scale (the dequantisation factor) is ``amax / 448`` and the data is
  ``saturate(x * (448 / amax))`` cast to ``float8_e4m3fn``;
* ``round_scale=True``: the stored scale is the power of two ``2 ** ceil(log2(amax / 448))`` and the data is
  ``x`` times its (exact) inverse, saturated and cast;
* ``use_ue8m0=True`` (only with ``round_scale``): the power-of-two scales are stored as their biased 8-bit
  exponents (UE8M0, ``float32 bits >> 23``), four consecutive groups packed little-endian into one int32:
  group ``4p + b`` is byte ``b`` (bits ``8b .. 8b+7``) of int ``p``. When ``H / 128`` is not a multiple of 4 the
  missing groups of the last int hold exponent 127, i.e. scale 1.0.

``x == dequant(quant(x))`` up to the E4M3 rounding: every element is rounded to 3 mantissa bits, so the error of
an element is at most ``2**-4`` of its own magnitude for normal E4M3 values and at most half an E4M3 subnormal
step (``2**-10``) times the group's scale below that.

Every function is pure PyTorch and works on any device. Only IEEE-exact operations feed the results
(``abs``/``max``, one correctly rounded division, exponent bit manipulation, a multiply, the round-to-nearest-even
cast), so CPU and GPU produce the same bits. There are no loops over tokens and no host synchronisation, so the
casts can be captured in a CUDA graph (``pack_ue8m0(validate=True)`` is the one exception: it checks values).

Inputs of any leading shape are accepted: ``[T, H]`` for normal dispatch and ``[E, N, H]`` for the receive
tensors of low-latency dispatch; the leading dims are treated as tokens and the scales keep them
(``[..., H / 128]`` or ``[..., ceil(H / 512)]``), contiguous.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .errors import expect

#: Largest finite value of ``torch.float8_e4m3fn``.
FP8_E4M3_MAX = 448.0
#: Channels that share one scale.
FP8_GROUP = 128
#: Scale groups packed into one int32 by UE8M0 packing.
UE8M0_GROUPS_PER_INT = 4
#: Floor of the per-group amax, so that an all-zero group gets a finite, non-zero scale.
AMAX_FLOOR = 1e-4
#: Biased exponent of 1.0 (the padding value of UE8M0 packing).
UE8M0_ONE = 127

_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_hidden(name: str, t: torch.Tensor) -> int:
    """Check that ``t`` is ``[..., H]`` with ``H`` a positive multiple of 128; return the number of groups."""
    expect(t.dim() in (2, 3), f"{name} must be 2-D [T, H] or 3-D [E, N, H], got shape {tuple(t.shape)}")
    hidden = t.size(-1)
    expect(
        hidden > 0 and hidden % FP8_GROUP == 0,
        f"{name} must have a hidden size (last dim) that is a positive multiple of {FP8_GROUP}, "
        f"got shape {tuple(t.shape)}",
    )
    return hidden // FP8_GROUP


def _ceil_pow2(v: torch.Tensor) -> torch.Tensor:
    """``2 ** ceil(log2(v))`` for positive, normal float32 ``v``, computed exactly on the bits.

    ``v`` is ``2**e * 1.m``: the result is ``2**e`` when the mantissa is zero, else ``2**(e + 1)``.
    """
    bits = v.view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    exponent = exponent + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exponent << 23).view(torch.float32)


def _pack(scales: torch.Tensor) -> torch.Tensor:
    """UE8M0-pack power-of-two float32 ``scales [..., S]`` into int32 ``[..., ceil(S / 4)]`` (no checks)."""
    num_groups = scales.size(-1)
    num_ints = -(-num_groups // UE8M0_GROUPS_PER_INT)
    exponents = ((scales.contiguous().view(torch.int32) >> 23) & 0xFF).to(torch.int64)
    pad = num_ints * UE8M0_GROUPS_PER_INT - num_groups
    if pad:
        exponents = torch.nn.functional.pad(exponents, (0, pad), value=UE8M0_ONE)
    exponents = exponents.view(*exponents.shape[:-1], num_ints, UE8M0_GROUPS_PER_INT)
    shifts = torch.arange(0, 32, 8, dtype=torch.int64, device=scales.device)
    word = (exponents << shifts).sum(dim=-1)  # in [0, 2**32): the unsigned 32-bit pattern
    word = torch.where(word >= 2**31, word - 2**32, word)  # the same bits as a signed int32
    return word.to(torch.int32)


def _unpack(packed: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Inverse of :func:`_pack`: int32 ``[..., P]`` -> float32 ``[..., num_groups]`` (no checks)."""
    word = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 8, dtype=torch.int64, device=packed.device)
    exponents = (word.unsqueeze(-1) >> shifts) & 0xFF  # [..., P, 4]
    exponents = exponents.flatten(-2)[..., :num_groups].to(torch.int32)
    return (exponents << 23).view(torch.float32)


def pack_ue8m0(scales: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """Pack power-of-two scales into UE8M0 bytes, four groups per int32.

    Args:
        scales: ``[..., S]`` float32, any device; every value a positive normal power of two
            (``2**-126 .. 2**127``).
        validate: check that every value is such a power of two. This reads the values back to the host (a
            synchronisation); pass ``False`` in graph-captured code where the values are known to be valid.

    Returns:
        ``[..., ceil(S / 4)]`` int32 on the device of ``scales``: group ``4p + b`` is byte ``b`` (bits
        ``8b .. 8b+7``, little-endian) of int ``p``; that byte is the biased exponent of the scale
        (``float32 bits >> 23``). Missing groups of the last int are padded with 127 (scale 1.0).
    """
    expect(isinstance(scales, torch.Tensor), f"scales must be a torch.Tensor, got {type(scales).__name__}")
    expect(scales.dtype == torch.float32, f"scales must be float32, got {scales.dtype}")
    expect(scales.dim() >= 1 and scales.size(-1) > 0, f"scales must be [..., S] with S > 0, got {tuple(scales.shape)}")
    if validate:
        bits = scales.contiguous().view(torch.int32)
        exponent = (bits >> 23) & 0xFF
        ok = (bits >= 0) & ((bits & 0x7FFFFF) == 0) & (exponent > 0) & (exponent < 0xFF)
        expect(bool(ok.all()), "scales must hold positive normal powers of two (as round_scale=True produces)")
    return _pack(scales)


def unpack_ue8m0(packed: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Unpack UE8M0 scales packed by :func:`pack_ue8m0`.

    Args:
        packed: ``[..., P]`` int32, any device.
        num_groups: number of scale groups to return, ``4 * (P - 1) < num_groups <= 4 * P``.

    Returns:
        ``[..., num_groups]`` float32 on the device of ``packed``: ``2 ** (byte - 127)`` per group (byte 0 decodes
        to 0.0 and byte 255 to inf, which the casts never produce).
    """
    expect(isinstance(packed, torch.Tensor), f"packed must be a torch.Tensor, got {type(packed).__name__}")
    expect(packed.dtype == torch.int32, f"packed must be int32, got {packed.dtype}")
    expect(packed.dim() >= 1, f"packed must be [..., P], got shape {tuple(packed.shape)}")
    expect(isinstance(num_groups, int) and num_groups > 0, f"num_groups must be a positive int, got {num_groups!r}")
    num_ints = packed.size(-1)
    expect(
        -(-num_groups // UE8M0_GROUPS_PER_INT) == num_ints,
        f"num_groups={num_groups} needs {-(-num_groups // UE8M0_GROUPS_PER_INT)} packed ints per row, "
        f"but packed has {num_ints} (shape {tuple(packed.shape)})",
    )
    return _unpack(packed, num_groups)


def per_token_cast_to_fp8(
    x: torch.Tensor, round_scale: bool = False, use_ue8m0: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cast ``x`` to FP8 E4M3 with one scale per token per 128 channels (see the module docstring).

    Args:
        x: ``[T, H]`` (or ``[E, N, H]``) bfloat16, float16 or float32, any device; ``H`` a multiple of 128.
        round_scale: round each scale up to a power of two (``2 ** ceil(log2(amax / 448))``).
        use_ue8m0: return the scales UE8M0-packed (requires ``round_scale``).

    Returns:
        ``(x_fp8, scales)`` on the device of ``x``:

        * ``x_fp8``: ``[T, H]`` ``torch.float8_e4m3fn``, ``|x_fp8| <= 448``;
        * ``scales``: the dequantisation factors, ``x ~= x_fp8 * scale``: ``[T, H / 128]`` float32, or with
          ``use_ue8m0`` ``[T, ceil(H / 512)]`` int32 (see :func:`pack_ue8m0`).

        For a 3-D ``x`` the leading ``[E, N]`` replace ``[T]``.
    """
    expect(isinstance(x, torch.Tensor), f"x must be a torch.Tensor, got {type(x).__name__}")
    expect(x.dtype in _INPUT_DTYPES, f"x must be bfloat16, float16 or float32, got {x.dtype}")
    num_groups = _check_hidden("x", x)
    expect(not use_ue8m0 or round_scale, "use_ue8m0=True requires round_scale=True (UE8M0 holds powers of two)")

    groups = x.reshape(*x.shape[:-1], num_groups, FP8_GROUP)
    # max |x| per group in one pass, without a float32 copy of x (exact: a max of exactly widened values).
    amax = torch.linalg.vector_norm(groups, ord=float("inf"), dim=-1, dtype=torch.float32)
    amax = amax.clamp_min(AMAX_FLOOR)  # [..., G] float32
    # A tensor divisor: PyTorch's CUDA division by a Python scalar multiplies by its rounded reciprocal, and
    # ``scalar / tensor`` is ``reciprocal(tensor) * scalar`` everywhere; both round twice. ``full`` launches a fill
    # (no host copy), so this stays graph-capturable and gives the correctly rounded quotient on every device.
    fp8_max = torch.full((), FP8_E4M3_MAX, dtype=torch.float32, device=x.device)
    if round_scale:
        scales = _ceil_pow2(amax / fp8_max)
        inverse = 1.0 / scales  # exact: the inverse of a power of two
    else:
        scales = amax / fp8_max
        inverse = fp8_max / amax
    # Saturation needs no clamp pass: |x| <= amax, so |x * inverse| <= 448 exactly with round_scale, and at most
    # 448 * (1 + 2**-24)**2 (two float32 roundings) by default, which the round-to-nearest-even cast maps to 448
    # (the next E4M3 value is 480's NaN slot, the midpoint 464). tests/test_fp8.py checks both facts.
    scaled = torch.mul(groups, inverse.unsqueeze(-1))  # float32 (type promotion), one pass over x
    x_fp8 = scaled.to(torch.float8_e4m3fn).view(x.shape)
    if use_ue8m0:
        return x_fp8, _pack(scales)
    return x_fp8, scales


def per_token_cast_back(
    x_fp8: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Dequantise the output of :func:`per_token_cast_to_fp8`: ``x = x_fp8 * scale`` per 128-channel group.

    Args:
        x_fp8: ``[T, H]`` (or ``[E, N, H]``) ``torch.float8_e4m3fn``, any device; ``H`` a multiple of 128.
        scales: on the device of ``x_fp8``, with its leading dims: ``[T, H / 128]`` float32, or UE8M0-packed
            ``[T, ceil(H / 512)]`` int32.
        dtype: floating dtype of the result.

    Returns:
        ``[T, H]`` (the shape of ``x_fp8``) of ``dtype`` on the device of ``x_fp8``; the product is computed in
        float32 and rounded once to ``dtype``.
    """
    expect(isinstance(x_fp8, torch.Tensor), f"x_fp8 must be a torch.Tensor, got {type(x_fp8).__name__}")
    expect(isinstance(scales, torch.Tensor), f"scales must be a torch.Tensor, got {type(scales).__name__}")
    expect(x_fp8.dtype == torch.float8_e4m3fn, f"x_fp8 must be torch.float8_e4m3fn, got {x_fp8.dtype}")
    expect(
        isinstance(dtype, torch.dtype) and dtype.is_floating_point,
        f"dtype must be a floating torch.dtype, got {dtype!r}",
    )
    num_groups = _check_hidden("x_fp8", x_fp8)
    expect(scales.device == x_fp8.device, f"scales must be on {x_fp8.device} like x_fp8, got {scales.device}")
    lead = tuple(x_fp8.shape[:-1])
    if scales.dtype == torch.int32:
        expected = lead + (-(-num_groups // UE8M0_GROUPS_PER_INT),)
        expect(
            tuple(scales.shape) == expected,
            f"scales (int32, UE8M0-packed) must have shape {expected} for x_fp8 of shape {tuple(x_fp8.shape)}, "
            f"got {tuple(scales.shape)}",
        )
        scales = _unpack(scales, num_groups)
    else:
        expect(scales.dtype == torch.float32, f"scales must be float32 or UE8M0-packed int32, got {scales.dtype}")
        expected = lead + (num_groups,)
        expect(
            tuple(scales.shape) == expected,
            f"scales (float32) must have shape {expected} for x_fp8 of shape {tuple(x_fp8.shape)}, "
            f"got {tuple(scales.shape)}",
        )
    groups = x_fp8.reshape(*lead, num_groups, FP8_GROUP).float()
    return (groups * scales.unsqueeze(-1)).to(dtype).view(x_fp8.shape)

