"""The deployment tensor layout of one quantized linear layer (numpy only, no graph, no files).

Weights are stored [n, k] = [out, in] (the transpose of graphq's [K, N] QuantizedWeight) under the layer's Hugging
Face name, e.g. ``model.layers.0.self_attn.q_proj.weight``. Per scheme:

W8A16 / W4A16 (weight-only), and W8A8_DYNAMIC (int8 per-channel symmetric weights, per-token activation scales
computed at run time: the same tensors as W8A16, weight_offset zeros)
    ``weight``         int8 [n, k]; for 4 bits packed two per byte into int8 [n, k/2] unless --no-pack: byte j of
                       row n holds k-index 2j in its low nibble and 2j+1 in its high nibble, each a two's-complement
                       4-bit value in [-8, 7].
    ``weight_scale``   float32 [n, 1] per channel, [n, ceil(k/group)] per group.
    ``weight_offset``  float32, same shape, in the signed domain: w = (weight - weight_offset) * weight_scale
                       (zeros for symmetric weights). graphq's unsigned asymmetric integers q in [0, 2^b) with zero
                       point z are stored as q - 2^(b-1) and z - 2^(b-1).
    ``bias``           the float bias [n] in the model's float type, when the layer has one.

W8A8S (sparse "lowbit", msModelSlim): exactly the W8A8 tensors; the int8 weight holds the pruned zeros and the
4-bit inlier levels (graphq.algorithms.lowbit). ``graphq compress`` turns it into W8A8SC (graphq.artifacts.w8a8sc).

W8A8 (per-channel symmetric int8 weights, per-tensor int8 activations x_q = round(x / input_scale) + input_offset)
    ``weight``         int8 [n, k].
    ``input_scale``    [1] float16 for fp16 models, float32 otherwise.
    ``input_offset``   [1] same type, an integer value.
    ``deq_scale``      [n] = input_scale * weight_scale; float32, or for fp16 models int64 holding the float32's bits.
    ``quant_bias``     int32 [n] = round(bias / deq_scale) - input_offset * sum_k weight[n, k]   (MindIE convention),
                       so that y = deq_scale * (sum_k x_q[k] * weight[n, k] + quant_bias) ~= x @ W + bias.

W4A8_DYNAMIC / W4A8 (int4 per-group weights, int8 activations per token / per tensor): msModelSlim's two-level
weight scales, as vllm-ascend's AscendW4A8DynamicLinearMethod reads them
    ``weight``               int8 [n, k] values in [-8, 7] (V0, --no-pack), or packed along n [n/2, k] (format
                             version 1.0.0), as W4A16.
    ``weight_scale``         float32 [n, 1], the first level (per channel): a power of two near max|w| / 127, so
                             that weight * weight_scale_second lies on an int8-like range and the product of the two
                             levels is exactly graphq's group scale.
    ``weight_offset``        float32 [n, 1], zeros.
    ``weight_scale_second``  float32 [n, ceil(k / group)], the group scale divided by weight_scale (msModelSlim's
                             loaders take k / group: --target vllm-ascend refuses a group that does not divide k).
    ``weight_offset_second`` float32 [n, ceil(k / group)], the group zero point in the signed domain (zeros when
                             symmetric): w = (weight - weight_offset_second) * weight_scale_second * weight_scale.
    ``scale_bias``           float32, version 1.0.0 only: 8 * sum_k weight * weight_scale_second * weight_scale per
                             output channel, [n, 1] for column-parallel linears, [n, 16] (the sum over 16 equal
                             slices of k, one per tensor-parallel rank up to 16) for row-parallel ones (o_proj,
                             down_proj); vllm-ascend's linear kernels do not read it (msModelSlim computes it for
                             its MoE kernels' unsigned int4 path).
    W4A8 (static) adds ``input_scale`` / ``input_offset`` [1] as W8A8; there is no deq_scale / quant_bias (a
    per-group weight has no single integer-output scale) and the bias stays a FLOAT tensor.
    Per channel (--group-size -1): weight_scale / weight_offset hold the scale and signed zero point, no *_second.
"""

from __future__ import annotations

import numpy as np

from graphq.algorithms.rtn import QuantizedWeight
from graphq.errors import GraphqError

# graphq scheme -> the tensor type the description gives its tensors (MindIE's names).
TYPES = {"w4a16": "W4A16", "w8a16": "W8A16", "w8a8": "W8A8", "w8a8-dynamic": "W8A8_DYNAMIC", "w8a8s": "W8A8S",
         "w4a8": "W4A8", "w4a8-dynamic": "W4A8_DYNAMIC"}
# Schemes stored with the W8A8 tensors (weight, input_scale, input_offset, deq_scale, quant_bias).
W8A8_LAYOUT_SCHEMES = ("w8a8", "w8a8s")
SCHEME_OF_TYPE = {kind: scheme for scheme, kind in TYPES.items()}
SCHEMES = tuple(TYPES)
WEIGHT_ONLY_SUFFIXES = ("weight", "weight_scale", "weight_offset")
W8A8_SUFFIXES = ("weight", "input_scale", "input_offset", "deq_scale", "quant_bias")
#: Schemes stored with msModelSlim's W4A8 tensors (two-level weight scales; static ones add input_scale / offset).
W4A8_LAYOUT_SCHEMES = ("w4a8", "w4a8-dynamic")
#: Schemes whose int4 weights may be packed two per byte.
INT4_SCHEMES = ("w4a16", *W4A8_LAYOUT_SCHEMES)
W4A8_SECOND_SUFFIXES = ("weight_scale_second", "weight_offset_second")
#: Row-parallel linears (split by input channel under tensor parallelism): scale_bias has 16 columns for them.
ROW_PARALLEL = ("o_proj", "down_proj")
SCALE_BIAS_SLICES = 16
PACKING = "int4_pairs_low_nibble_first"  # graphq's older layout: pairs along k, [n, k/2]
#: msModelSlim's packed int4 (ascendV1, and MindIE's format version 1.0.0): pairs of adjacent output rows, [n/2, k].
PACKING_ALONG_N = "int4_pairs_along_n_low_nibble_first"
# Codebook (LUT) layers (graphq.artifacts.codebook: weight = packed codes, weight_lut, weight_lut_scale): their
# tensor type -> scheme. NF4 layers are typed NF4 (msModelSlim's name), other tables W<b>A16_LUT; a model whose
# quantized layers are codebooks has model_quant_type W4A16_LUT / W3A16_LUT.
LUT_TYPES = {"W4A16_LUT": "w4a16", "W3A16_LUT": "w3a16", "NF4": "w4a16"}
LUT_SUFFIXES = ("weight", "weight_lut", "weight_lut_scale")
#: a description's model_quant_type -> graphq scheme (uniform and codebook models)
MODEL_TYPES = {**SCHEME_OF_TYPE, "W4A16_LUT": "w4a16", "W3A16_LUT": "w3a16"}


def lut_type(bits: int, weight_format: str) -> str:
    """The description type of a codebook layer: NF4 for the NF4 table, else W<bits>A16_LUT."""
    return "NF4" if weight_format == "nf4" else f"W{bits}A16_LUT"


def model_quant_type(scheme: str, codebook: bool) -> str:
    """model_quant_type of a model of ``scheme`` whose quantized layers are codebooks (or not)."""
    return f"W{scheme[1]}A16_LUT" if codebook else TYPES[scheme]


def suffixes_for(scheme: str) -> tuple[str, ...]:
    """The tensors a layer of ``scheme`` must have (a float bias may come with all but W8A8)."""
    if scheme == "w4a8":
        return WEIGHT_ONLY_SUFFIXES + ("input_scale", "input_offset")
    return W8A8_SUFFIXES if scheme in W8A8_LAYOUT_SCHEMES else WEIGHT_ONLY_SUFFIXES


def optional_suffixes(scheme: str) -> tuple[str, ...]:
    """Tensors a layer of ``scheme`` may have beyond ``suffixes_for`` (and a float bias)."""
    base = ("bias", "weight_scale", "weight_offset")
    return base + W4A8_SECOND_SUFFIXES + ("scale_bias",) if scheme in W4A8_LAYOUT_SCHEMES else base


def bits_of(scheme: str) -> int:
    return 4 if scheme in INT4_SCHEMES else 8


def pack_int4(weight: np.ndarray) -> np.ndarray:
    """int8 [n, k] values in [-8, 7] -> int8 [n, k/2]: even k in the low nibble, odd k in the high nibble."""
    if weight.shape[1] % 2:
        raise GraphqError(f"cannot pack int4 pairs of a layer with odd input size {weight.shape[1]}: use --no-pack")
    u = weight.astype(np.uint8) & 0x0F
    return (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8).view(np.int8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """Inverse of pack_int4: int8 [n, k/2] -> int8 [n, k] in [-8, 7]."""
    u = packed.view(np.uint8)
    nibbles = np.empty((u.shape[0], u.shape[1] * 2), dtype=np.int16)
    nibbles[:, 0::2] = u & 0x0F
    nibbles[:, 1::2] = u >> 4
    return np.where(nibbles >= 8, nibbles - 16, nibbles).astype(np.int8)


def pack_int4_along_n(weight: np.ndarray) -> np.ndarray:
    """int8 [n, k] values in [-8, 7] -> int8 [n/2, k] as msModelSlim packs per-group int4: byte (j, c) holds
    row 2j in its low nibble and row 2j+1 in its high nibble, ``(w[2j+1] << 4) | (w[2j] & 0xF)``."""
    if weight.shape[0] % 2:
        raise GraphqError(f"cannot pack int4 pairs of output rows for a layer with odd output size {weight.shape[0]}: use --no-pack")
    u = weight.astype(np.uint8) & 0x0F
    return (u[0::2] | (u[1::2] << 4)).astype(np.uint8).view(np.int8)


def unpack_int4_along_n(packed: np.ndarray) -> np.ndarray:
    """Inverse of pack_int4_along_n: int8 [n/2, k] -> int8 [n, k] in [-8, 7]."""
    u = packed.view(np.uint8)
    nibbles = np.empty((u.shape[0] * 2, u.shape[1]), dtype=np.int16)
    nibbles[0::2] = u & 0x0F
    nibbles[1::2] = u >> 4
    return np.where(nibbles >= 8, nibbles - 16, nibbles).astype(np.int8)


def encode_weight_only(
    qw: QuantizedWeight, bias: np.ndarray | None, float_dtype: np.dtype, pack: bool,
    pack_along: str = "k", scale_dtype: np.dtype = np.float32,
) -> dict[str, np.ndarray]:
    """A weight-only QuantizedWeight -> {suffix: array} in the deployment layout.

    ``pack_along`` "k" is graphq's older [n, k/2] packing, "n" msModelSlim's [n/2, k]; ``scale_dtype`` is the
    stored type of weight_scale / weight_offset (msModelSlim writes float32 whatever the model's dtype)."""
    half = 1 << (qw.bits - 1)
    if qw.symmetric:
        signed = qw.q.astype(np.int8)
        offset = np.zeros(qw.scales.shape, dtype=np.float32)
    else:
        signed = (qw.q.astype(np.int16) - half).astype(np.int8)
        offset = qw.zero_points.astype(np.float32) - half
    weight = np.ascontiguousarray(signed.T)
    if qw.bits == 4 and pack:
        weight = pack_int4_along_n(weight) if pack_along == "n" else pack_int4(weight)
    tensors = {
        "weight": weight,
        "weight_scale": np.ascontiguousarray(qw.scales.T.astype(scale_dtype)),
        "weight_offset": np.ascontiguousarray(offset.T.astype(scale_dtype)),
    }
    if bias is not None:
        tensors["bias"] = np.asarray(bias).astype(float_dtype)
    return tensors


def decode_weight_only(
    tensors: dict[str, np.ndarray], bits: int, k: int, group_size: int, packed: bool, pack_along: str = "k"
) -> QuantizedWeight:
    """Inverse of encode_weight_only: the QuantizedWeight quantize emitted (integers, scales, zero points).

    All-zero offsets decode as symmetric: an asymmetric weight whose zero points all sit at 2^(b-1) dequantizes to
    the same values either way."""
    symmetric = not tensors["weight_offset"].any()
    weight = tensors["weight"]
    if bits == 4 and packed:
        signed = unpack_int4_along_n(weight) if pack_along == "n" else unpack_int4(weight)[:, :k]
    else:
        signed = weight
    n_groups = tensors["weight_scale"].shape[1]
    half = 1 << (bits - 1)
    scales = np.ascontiguousarray(tensors["weight_scale"].astype(np.float32).T)
    if symmetric:
        q, zero_points = np.ascontiguousarray(signed.T.astype(np.int8)), None
    else:
        q = np.ascontiguousarray((signed.T.astype(np.int16) + half).astype(np.uint8))
        zero_points = np.ascontiguousarray((tensors["weight_offset"].astype(np.float32).T + half).round().astype(np.uint8))
    return QuantizedWeight(q=q, scales=scales, zero_points=zero_points, bits=bits, group_size=k if n_groups == 1 else group_size)


def _first_level_scale(qw: QuantizedWeight) -> np.ndarray:
    """W4A8's per-channel weight_scale [N]: the power of two 2^ceil(log2(max|w| / 127)) (1 for an all-zero
    channel), so dividing the group scales by it and multiplying back are exact in float32."""
    peak = np.abs(qw.dequantize()).max(axis=0).astype(np.float64)
    exponent = np.where(peak > 0, np.ceil(np.log2(np.maximum(peak, 1e-300) / 127.0)), 0.0)
    return np.ldexp(np.float32(1.0), exponent.astype(np.int32)).astype(np.float32)


def encode_w4a8(
    qw: QuantizedWeight, bias: np.ndarray | None, float_dtype: np.dtype, pack: bool, row_parallel: bool,
    input_scale: float | None = None, input_offset: int | None = None, act_dtype: np.dtype = np.float32,
) -> dict[str, np.ndarray]:
    """A 4-bit per-group QuantizedWeight (and, static, the per-tensor activation parameters) -> msModelSlim's
    W4A8 / W4A8_DYNAMIC tensors (see the module docstring). The integers and zero points are W4A16's
    (``encode_weight_only``); the group scales are split into the two levels."""
    if qw.bits != 4:
        raise GraphqError("W4A8 artifacts need 4-bit weights")
    tensors = encode_weight_only(qw, bias, float_dtype, pack, pack_along="n")
    if qw.n_groups > 1:
        first = _first_level_scale(qw)  # [N]
        group_scales = tensors.pop("weight_scale")  # [n, groups]
        tensors["weight_scale_second"] = np.ascontiguousarray((group_scales / first[:, None]).astype(np.float32))
        tensors["weight_offset_second"] = tensors.pop("weight_offset")
        tensors["weight_scale"] = first[:, None].copy()
        tensors["weight_offset"] = np.zeros_like(tensors["weight_scale"])
    if pack:  # format version 1.0.0 carries the precomputed scale_bias
        signed = qw.q.astype(np.float64) - (0 if qw.symmetric else 8)  # [K, N], the stored codes
        scales = np.repeat(qw.scales.astype(np.float64), qw.group_size, axis=0)[: qw.shape[0]]
        products = signed * scales  # weight * weight_scale_second * weight_scale
        slices = np.array_split(products, SCALE_BIAS_SLICES if row_parallel else 1, axis=0)
        tensors["scale_bias"] = np.ascontiguousarray(np.stack([8 * part.sum(axis=0) for part in slices], axis=1)
                                                     .astype(np.float32))
    if input_scale is not None:
        tensors["input_scale"] = np.array([input_scale], dtype=act_dtype)
        tensors["input_offset"] = np.array([input_offset], dtype=act_dtype)
    return tensors


def decode_w4a8(tensors: dict[str, np.ndarray], k: int, group_size: int, packed: bool) -> QuantizedWeight:
    """Inverse of encode_w4a8's weight part: the two scale levels multiplied back into group scales."""
    weight_only = {"weight": tensors["weight"]}
    if "weight_scale_second" in tensors:
        first = tensors["weight_scale"].astype(np.float32).reshape(-1, 1)
        weight_only["weight_scale"] = (tensors["weight_scale_second"].astype(np.float32) * first).astype(np.float32)
        weight_only["weight_offset"] = tensors["weight_offset_second"].astype(np.float32)
    else:
        weight_only["weight_scale"] = tensors["weight_scale"]
        weight_only["weight_offset"] = tensors["weight_offset"]
    return decode_weight_only(weight_only, 4, k, group_size, packed, pack_along="n")


def encode_w8a8(
    qw: QuantizedWeight, bias: np.ndarray | None, input_scale: float, input_offset: int, float_dtype: np.dtype,
    serving_dtype: str | None = None, weight_params: bool = False,
) -> dict[str, np.ndarray]:
    """A per-channel symmetric int8 weight and per-tensor activation parameters -> the W8A8 layout.

    ``serving_dtype`` (fp32/fp16/bf16) chooses deq_scale's encoding as msModelSlim writes it: the float32's bits in
    an int64 for fp32 and fp16 serving, plain float32 for bf16 (without it: int64 only for fp16 models, graphq's
    older rule). ``weight_params`` adds weight_scale / weight_offset [n, 1] float32 (offsets 0), which
    msModelSlim writes for W8A8 layers too."""
    if qw.bits != 8 or not qw.symmetric or qw.n_groups != 1:
        raise GraphqError("W8A8 artifacts need per-channel symmetric 8-bit weights")
    weight = np.ascontiguousarray(qw.q.astype(np.int8).T)
    act_dtype = np.float16 if np.dtype(float_dtype) == np.float16 else np.float32
    # deq_scale uses input_scale as stored (float16 for fp16 models), the value the runtime quantizes with.
    input_scale = float(act_dtype(input_scale))
    deq_scale = (np.float64(input_scale) * qw.scales[0].astype(np.float64)).astype(np.float32)
    float_bias = np.zeros(weight.shape[0]) if bias is None else np.asarray(bias, dtype=np.float64)
    quant_bias = np.round(float_bias / deq_scale.astype(np.float64)) - int(input_offset) * weight.astype(np.int64).sum(1)
    if np.abs(quant_bias).max(initial=0) >= 2**31:
        raise GraphqError("quant_bias overflows int32: the bias is too large for its deq_scale")
    deq_as_bits = serving_dtype != "bf16" if serving_dtype is not None else act_dtype == np.float16
    tensors = {
        "weight": weight,
        "input_scale": np.array([input_scale], dtype=act_dtype),
        "input_offset": np.array([input_offset], dtype=act_dtype),
        "deq_scale": deq_scale.view(np.uint32).astype(np.int64) if deq_as_bits else deq_scale,
        "quant_bias": quant_bias.astype(np.int32),
    }
    if weight_params:
        tensors["weight_scale"] = np.ascontiguousarray(qw.scales.T.astype(np.float32))
        tensors["weight_offset"] = np.zeros_like(tensors["weight_scale"])
    return tensors


def decode_w8a8(tensors: dict[str, np.ndarray]) -> tuple[QuantizedWeight, float, int, np.ndarray]:
    """-> (weight, input_scale, input_offset, the float bias recovered from quant_bias)."""
    weight = tensors["weight"]
    deq_scale = tensors["deq_scale"]
    if deq_scale.dtype == np.int64:
        deq_scale = deq_scale.astype(np.uint32).view(np.float32)
    input_scale = float(tensors["input_scale"][0])
    input_offset = int(round(float(tensors["input_offset"][0])))
    scales = (deq_scale.astype(np.float64) / input_scale).astype(np.float32)[None, :]
    qw = QuantizedWeight(q=np.ascontiguousarray(weight.T), scales=scales, zero_points=None, bits=8, group_size=weight.shape[1])
    bias = (tensors["quant_bias"].astype(np.float64) + input_offset * weight.astype(np.int64).sum(1)) * deq_scale
    return qw, input_scale, input_offset, bias.astype(np.float32)


FLOAT_DTYPE_NAMES = ("F16", "BF16", "F32")


def _check_w4a8(prefix, scheme, specs, n, k, spec, fail) -> None:
    for suffix in ("weight_scale", "weight_offset"):
        d, s = spec(suffix)
        if d not in FLOAT_DTYPE_NAMES or s != (n, 1):
            raise fail(suffix, f"dtype {d} shape {list(s)}", f"a float [{n}, 1]")
    second = [f"{prefix}.{suffix}" in specs for suffix in W4A8_SECOND_SUFFIXES]
    if any(second) and not all(second):
        missing = W4A8_SECOND_SUFFIXES[second.index(False)]
        raise GraphqError(f"{prefix}.{missing} is missing: per-group {TYPES[scheme]} layers need both "
                          f"{' and '.join(W4A8_SECOND_SUFFIXES)}")
    if all(second):
        d, s = specs[f"{prefix}.weight_scale_second"]
        if d not in FLOAT_DTYPE_NAMES or len(s) != 2 or s[0] != n or not 1 <= s[1] <= k:
            raise fail("weight_scale_second", f"dtype {d} shape {list(s)}", f"a float [{n}, ceil(k / group)]")
        d2, s2 = specs[f"{prefix}.weight_offset_second"]
        if d2 not in FLOAT_DTYPE_NAMES + ("I64", "I32", "I8") or s2 != s:
            raise fail("weight_offset_second", f"dtype {d2} shape {list(s2)}", f"[{n}, {s[1]}]")
    if f"{prefix}.scale_bias" in specs:
        d, s = specs[f"{prefix}.scale_bias"]
        if d not in FLOAT_DTYPE_NAMES or len(s) != 2 or s[0] != n or s[1] not in (1, SCALE_BIAS_SLICES):
            raise fail("scale_bias", f"dtype {d} shape {list(s)}", f"F32 [{n}, 1] or [{n}, {SCALE_BIAS_SLICES}]")
    if scheme == "w4a8":
        for suffix in ("input_scale", "input_offset"):
            d, s = spec(suffix)
            if d not in FLOAT_DTYPE_NAMES or s != (1,):
                raise fail(suffix, f"dtype {d} shape {list(s)}", "a float [1]")


def packing_of(prefix: str, scheme: str, specs: dict[str, tuple[str, tuple[int, ...]]], declared: bool | str) -> str:
    """How a layer's int4 weight is stored: "none", "k" ([n, k/2]) or "n" ([n/2, k]).

    ``declared`` True/"k" and "n" come from graphq's metadata; "auto" (msModelSlim folders, which say nothing)
    reads it from the shapes: rows equal to weight_scale's rows are unpacked (V0), half of them packed along n (V1).
    """
    if scheme not in INT4_SCHEMES:
        return "none"
    if declared in ("k", "n", "none"):
        return declared
    if declared is not True and declared != "auto":
        return "none"
    if declared is True:
        return "k"
    weight, scale = specs.get(f"{prefix}.weight"), specs.get(f"{prefix}.weight_scale")
    if weight is None or scale is None or len(weight[1]) != 2 or len(scale[1]) != 2:
        return "none"
    return "n" if weight[1][0] * 2 == scale[1][0] else "none"


def check_layer(
    prefix: str, scheme: str, specs: dict[str, tuple[str, tuple[int, ...]]], packed: bool | str
) -> tuple[int, int]:
    """Check one layer's tensors (name -> (safetensors dtype, shape)) against the table; returns (n, k).

    ``packed``: see packing_of. Accepts graphq's layouts and msModelSlim's (float32, float16 or bfloat16 scales;
    W8A8 with or without weight_scale / weight_offset, deq_scale as int64 bits or float32).
    Raises GraphqError naming the first tensor whose dtype or shape is off the table.
    """

    def spec(suffix: str) -> tuple[str, tuple[int, ...]]:
        name = f"{prefix}.{suffix}"
        if name not in specs:
            raise GraphqError(f"{name} is missing: a {TYPES[scheme]} layer needs {', '.join(suffixes_for(scheme))}")
        return specs[name]

    def fail(suffix: str, what: str, expected: str) -> GraphqError:
        return GraphqError(f"{prefix}.{suffix} has {what}, but {TYPES[scheme]} needs {expected}: the artifact is not graphq's layout")

    dtype, shape = spec("weight")
    if dtype != "I8" or len(shape) != 2:
        raise fail("weight", f"dtype {dtype} shape {list(shape)}", "int8 [n, k]")
    n, k = shape
    packing = packing_of(prefix, scheme, specs, packed)
    if packing == "k":
        k *= 2
    elif packing == "n":
        n *= 2
    bias_name = f"{prefix}.bias"
    if bias_name in specs:
        d3, s3 = specs[bias_name]
        if d3 not in FLOAT_DTYPE_NAMES or s3 != (n,):
            raise fail("bias", f"dtype {d3} shape {list(s3)}", f"a float [{n}]")
    if scheme in W8A8_LAYOUT_SCHEMES:
        act_dtype, act_shape = spec("input_scale")
        if act_dtype not in FLOAT_DTYPE_NAMES or act_shape != (1,):
            raise fail("input_scale", f"dtype {act_dtype} shape {list(act_shape)}", "a float [1]")
        for suffix, expected_dtypes, expected_shape in (
            ("input_offset", FLOAT_DTYPE_NAMES, (1,)),
            ("deq_scale", ("I64", "F32"), (n,)),
            ("quant_bias", ("I32",), (n,)),
        ):
            d, s = spec(suffix)
            if d not in expected_dtypes or s != expected_shape:
                raise fail(suffix, f"dtype {d} shape {list(s)}", f"{'/'.join(expected_dtypes)} {list(expected_shape)}")
        for suffix in ("weight_scale", "weight_offset"):  # msModelSlim writes them; graphq's older layout did not
            if f"{prefix}.{suffix}" in specs:
                d, s = specs[f"{prefix}.{suffix}"]
                if d not in FLOAT_DTYPE_NAMES or s not in ((n, 1), (n,)):
                    raise fail(suffix, f"dtype {d} shape {list(s)}", f"a float [{n}, 1]")
        return n, k
    if scheme in W4A8_LAYOUT_SCHEMES:
        _check_w4a8(prefix, scheme, specs, n, k, spec, fail)
        return n, k
    d, s = spec("weight_scale")
    if d not in FLOAT_DTYPE_NAMES or len(s) != 2 or s[0] != n or not 1 <= s[1] <= k:
        raise fail("weight_scale", f"dtype {d} shape {list(s)}", f"F32 [{n}, groups]")
    d2, s2 = spec("weight_offset")
    if d2 != d or s2 != s:
        raise fail("weight_offset", f"dtype {d2} shape {list(s2)}", f"{d} {list(s)}")
    return n, k
