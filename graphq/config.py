"""Quantization configuration: one dataclass, loadable from YAML, validated up front."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from graphq.config_schema import check_config
from graphq.errors import GraphqError

#: Weight-only schemes and their weight bit width.
WEIGHT_ONLY_SCHEMES = {"w4a16": 4, "w8a16": 8, "w3a16": 3}  # w3a16: codebook (--weight-format) weights only
#: Schemes that quantize activations too (int8 activations); the value is the weight bit width: int8 weights per
#: channel, symmetric (w8a8*), or int4 weights per group like w4a16 (w4a8*).
ACTIVATION_SCHEMES = {"w8a8": 8, "w8a8-dynamic": 8, "w8a8s": 8, "w4a8": 4, "w4a8-dynamic": 4}
#: Activation schemes with static per-tensor activation ranges (calibrated); w8a8s: msModelSlim's sparse "lowbit".
STATIC_ACTIVATION_SCHEMES = ("w8a8", "w8a8s", "w4a8")
#: Activation schemes whose activations are quantized per token at run time.
DYNAMIC_ACTIVATION_SCHEMES = ("w8a8-dynamic", "w4a8-dynamic")
#: int4 per-group weights (rounded like w4a16: rtn, awq, gptq, ...) with int8 activations, emitted as QDQ.
W4A8_SCHEMES = ("w4a8", "w4a8-dynamic")
SCHEMES = {**WEIGHT_ONLY_SCHEMES, **ACTIVATION_SCHEMES}
ACT_METHODS = ("minmax", "percentile", "entropy", "mse", "auto")
# graphq.runtimes.layerwise: how the hidden states reach the next decoder layer; "auto" is resolved per method
# sequence (graphq.quantize.calibrated_quantize) before the engine sees it.
ENGINE_PROPAGATIONS = ("quantized", "float")
PROPAGATIONS = ("auto", *ENGINE_PROPAGATIONS)
KV_CACHE_TYPES = ("int8",)
SMOOTH_METHODS = ("smoothquant", "os+")
FORMATS = ("matmulnbits", "qdq")
SAVE_FORMATS = ("onnx", "safetensors", "numpy", "params")  # params: graphq.artifacts.params (every target)
# Weight methods are registered objects (graphq.weight_methods): any registered name, or a sequence joined with +.
PER_CHANNEL = -1


@dataclass
class QuantConfig:
    """What to quantize and how.

    group_size: weights share one scale per ``group_size`` input channels; -1 means per output channel.
    symmetric: None picks the scheme's default (asymmetric for 4 bits, symmetric for 8 bits).
    exclude: layers whose Hugging Face name matches any pattern stay float (glob or regular expression).
    method: rtn needs no data; awq, gptq and awq+gptq calibrate layer by layer on ``calib`` (a text, JSON or JSONL
    file; the shipped Sense and Sensibility sample when None) or on ``calib_texts``.
    scheme w8a8 (static per-tensor activations, calibrated with ``act_method``) and w8a8-dynamic (per-token scales
    computed at run time) quantize activations too; their weights are int8 per channel, symmetric, by RTN.
    scheme_overrides: {pattern: scheme} gives layers matching a pattern another scheme (first match wins).
    kv_cache: "int8" adds calibrated per-head QDQ on the present.* key/value outputs.
    smooth: smoothquant or os+ migrates activation outliers into the weights before W8A8 (alpha or "auto").
    reservoir_rows: token rows kept per linear input for the output-error searches (auto, smoothing alpha).
    act_fallback: W8A8 static input groups (q/k/v, gate/up, o, down of one layer) with the largest output error to
    keep with float activations (int8 weights, W8A16), as msModelSlim's disable_level does.
    """

    scheme: str = "w4a16"
    group_size: int = 128
    symmetric: bool | None = None
    format: str = "matmulnbits"
    method: str = "rtn"
    exclude: list[str] = field(default_factory=list)
    quantize_lm_head: bool = False
    seed: int = 0
    calib: str | None = None
    calib_texts: list[str] | None = None
    calib_field: str = "text"
    num_samples: int = 128
    seq_len: int = 512
    damp: float = 0.01
    act_order: bool = False
    awq_clip: bool = True
    # How calibrated methods carry the hidden states to the next decoder layer (graphq.runtimes.layerwise):
    # "quantized" runs each layer again once quantized, so later layers calibrate on its errors; "float" takes its
    # float outputs from the capture run (AutoAWQ's and NNCF's way), one onnxruntime run a layer instead of two;
    # "auto" is float for sequences of methods that need no more (awq), quantized for the rest (gptq, pruning).
    propagate: str = "auto"
    act_method: str = "minmax"
    percentile: float = 99.99
    kv_cache: str | None = None
    scheme_overrides: dict[str, str] = field(default_factory=dict)
    smooth: str | None = None
    smooth_alpha: float | str = 0.5
    smooth_all_linears: bool = False
    reservoir_rows: int = 512
    act_fallback: int = 0
    # Output: which files to write (model.onnx; safetensors + description; numpy dicts), shard size, int4 packing.
    save_format: list[str] = field(default_factory=lambda: ["onnx", "safetensors"])
    part_file_size: float | None = None
    pack: bool = True
    # MatMulNBits' accuracy_level: 0 computes in float (what graphq measures by default); 4 quantizes each block of
    # activations to int8 inside the kernel, onnxruntime CPU's fast path (verify measures what it costs).
    accuracy_level: int = 0
    # fuse_attention: each layer's attention becomes one onnxruntime GroupQueryAttention node with the rotary
    # embedding inside (graphq.passes.fuse_attention): a faster decode; positions then come from the attention mask.
    fuse_attention: bool = False
    # Sensitivity-ranked precision (issue 14): the N most sensitive linears float (or fallback_scheme), or a
    # bits-per-weight budget spent on the most sensitive; the ranking from sensitivity_file or a fresh analysis.
    disable_level: int = 0
    fallback_scheme: str | None = None
    target_bits: float | None = None
    sensitivity_file: str | None = None
    sensitivity_windows: int = 2
    # Sparsity (issue 10): pruning methods (magnitude, wanda, sparsegpt in --method) zero this fraction of each
    # linear's weights, or keep N of every M input channels (sparsity_pattern "2:4"); w8a8s keeps outliers beyond
    # sigma_factor standard deviations (at most a fraction ``fraction`` of a channel) on the 8-bit grid; compress
    # also writes the W8A8SC folders, split over tp_size tensor-parallel ranks.
    sparsity: float = 0.0
    sparsity_pattern: str | None = None
    sigma_factor: float = 3.0
    fraction: float = 0.01
    compress: bool = False
    tp_size: int = 1
    # Artifact targets and dtypes (issue 13)
    # target: the runtime whose layout the artifacts follow (graphq.artifacts.targets: mindie, vllm-ascend, ...).
    # dtype: the serving dtype (fp32, fp16, bf16) of float tensors and config.json torch_dtype; None takes the
    # source's (config.json torch_dtype from 'graphq export --dtype', else the ONNX float type).
    target: str = "mindie"
    dtype: str | None = None
    # quantize_embeddings: "int8" or "int4" puts the token embedding (and a tied lm_head) on an integer grid of
    # embedding_group_size along hidden (-1: per row); embedding_symmetric None: symmetric for int8 only.
    quantize_embeddings: str | None = None
    embedding_group_size: int = 32
    embedding_symmetric: bool | None = None
    # embedding_method: rtn, or gptq (a tied lm_head's inputs calibrate the shared table; needs calibration text).
    embedding_method: str = "rtn"
    # Knowledge distillation (issue 12, --method kd / awq+kd): the keys of graphq.kd.settings.KDSettings (dopt's
    # kd: block); device: where torch trains (auto: cuda when torch sees one, else cpu).
    kd: dict[str, Any] = field(default_factory=dict)
    # plan: a per-layer plan file (graphq plan; dopt's dopt_config.json layout) that decides each tensor's precision.
    plan: str | None = None
    device: str = "auto"
    # Codebook weights (issue 11): --weight-format uniform (the integer grid) or a lookup table per linear: lut
    # (learned per output channel / group), shared (one learned table, per-group scales), nf4, iq4nl (fixed tables);
    # lut_table_dtype: float16 table entries, or int8 entries with a float16 scale per table.
    weight_format: str = "uniform"
    lut_table_dtype: str = "float16"

    def group_size_for(self, in_features: int) -> int:
        """The group size for a layer with ``in_features`` inputs: a group covering all of K is per-channel (-1)."""
        return PER_CHANNEL if self.group_size == PER_CHANNEL or self.group_size >= in_features else self.group_size

    @property
    def needs_calibration(self) -> bool:
        """Weight-only layer-by-layer calibration: some method of the sequence needs data (AWQ / GPTQ)."""
        from graphq.weight_methods import resolve_methods

        # A method that uses data when given (lut) calibrates when --calib / --calib-texts name some.
        given = self.calib is not None or bool(self.calib_texts)
        return any(method.calibrated or (given and method.uses_data)
                   for method in resolve_methods(self.method))

    @property
    def bits(self) -> int:
        return SCHEMES[self.scheme]

    def scheme_for(self, layer_name: str) -> str:
        from graphq.selection import matches

        for pattern, scheme in self.scheme_overrides.items():
            if matches(layer_name, pattern):
                return scheme
        return self.scheme

    def for_scheme(self, scheme: str) -> "QuantConfig":
        """This config as it applies to layers of ``scheme`` (an override's or the main one)."""
        if scheme == self.scheme:
            sub = dataclasses.replace(self, scheme_overrides={})
        else:
            sub = dataclasses.replace(self, scheme=scheme, scheme_overrides={}, symmetric=None)
        if scheme in W4A8_SCHEMES:  # the weights keep the 4-bit options (group, sym/asym, method); QDQ only
            sub = dataclasses.replace(sub, format="qdq")
        elif scheme in ACTIVATION_SCHEMES:
            sub = dataclasses.replace(sub, method="rtn", format="qdq", group_size=PER_CHANNEL, symmetric=True)
        return sub

    @property
    def schemes(self) -> set[str]:
        return {self.scheme, *self.scheme_overrides.values()}

    @property
    def is_symmetric(self) -> bool:
        return self.symmetric if self.symmetric is not None else self.bits == 8

    def validate(self) -> "QuantConfig":
        check_config(self)  # types and ranges of every field first: the checks below may assume them
        if self.scheme not in SCHEMES:
            raise GraphqError(f"unknown scheme '{self.scheme}': choose one of {', '.join(SCHEMES)}")
        if not isinstance(self.scheme_overrides, dict):
            raise GraphqError("scheme_overrides must be a mapping of layer pattern: scheme")
        for pattern, scheme in self.scheme_overrides.items():
            if scheme not in SCHEMES:
                raise GraphqError(
                    f"unknown scheme '{scheme}' for pattern '{pattern}' in scheme_overrides: choose one of {', '.join(SCHEMES)}"
                )
        self._check_codebook_schemes()
        if self.scheme in W4A8_SCHEMES:
            self._validate_w4a8()
        elif self.scheme in ACTIVATION_SCHEMES and self.method != "rtn":
            from graphq.sparsity_config import activation_scheme_method_ok

            if not activation_scheme_method_ok(self.method, self.scheme):
                also = ", and gptq after one" if self.scheme == "w8a8s" else ""
                raise GraphqError(
                    f"--method {self.method} applies to weight-only schemes; {self.scheme} quantizes weights by RTN "
                    f"(use --smooth for activation outliers; pruning methods magnitude, wanda, sparsegpt apply{also})"
                )
        if self.scheme in ACTIVATION_SCHEMES and self.scheme not in W4A8_SCHEMES and self.symmetric is False:
            raise GraphqError(f"{self.scheme} weights are symmetric int8: drop --asym")
        if self.propagate not in PROPAGATIONS:
            raise GraphqError(f"unknown --propagate '{self.propagate}': choose one of {', '.join(PROPAGATIONS)}")
        if self.act_method not in ACT_METHODS:
            raise GraphqError(f"unknown activation method '{self.act_method}': choose one of {', '.join(ACT_METHODS)}")
        if not isinstance(self.percentile, (int, float)) or not 50 < self.percentile <= 100:
            raise GraphqError(f"--percentile must be in (50, 100], got {self.percentile}")
        if self.kv_cache is not None and self.kv_cache not in KV_CACHE_TYPES:
            raise GraphqError(f"unknown --kv-cache '{self.kv_cache}': choose one of {', '.join(KV_CACHE_TYPES)}")
        if self.smooth is not None:
            if self.smooth not in SMOOTH_METHODS:
                raise GraphqError(f"unknown --smooth '{self.smooth}': choose one of {', '.join(SMOOTH_METHODS)}")
            if not self.schemes & set(ACTIVATION_SCHEMES):
                raise GraphqError("--smooth only helps schemes that quantize activations: use --scheme w8a8, w8a8-dynamic, "
                                  "w4a8 or w4a8-dynamic")
        if self.smooth_alpha != "auto":
            try:
                alpha = float(self.smooth_alpha)
            except (TypeError, ValueError):
                alpha = -1.0
            if not 0 <= alpha <= 1:
                raise GraphqError(f"--smooth-alpha must be a number in [0, 1] or 'auto', got {self.smooth_alpha!r}")
            self.smooth_alpha = alpha
        if not isinstance(self.act_fallback, int) or self.act_fallback < 0:
            raise GraphqError(f"--act-fallback must be a count >= 0, got {self.act_fallback!r}")
        if self.reservoir_rows < 16:
            raise GraphqError(f"reservoir_rows must be at least 16, got {self.reservoir_rows}")
        if self.format not in FORMATS:
            raise GraphqError(f"unknown format '{self.format}': choose one of {', '.join(FORMATS)}")
        from graphq.weight_methods import resolve_methods

        resolve_methods(self.method)
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool):
            raise GraphqError(f"group size must be an integer, got {self.group_size!r}")
        if self.group_size != PER_CHANNEL:
            if self.group_size < 16 or self.group_size & (self.group_size - 1):
                raise GraphqError(
                    f"group size {self.group_size} is not supported: use a power of two >= 16 "
                    "(32, 64, 128, ...) or -1 for per-channel"
                )
        if not 0 < self.damp < 1:
            raise GraphqError(f"--damp must be between 0 and 1, got {self.damp}")
        if isinstance(self.save_format, str):
            self.save_format = [part.strip() for part in self.save_format.split(",") if part.strip()]
        unknown = [f for f in self.save_format if f not in SAVE_FORMATS]
        if unknown or not self.save_format:
            raise GraphqError(
                f"unknown save format '{','.join(unknown)}': --save-format takes a comma list of {', '.join(SAVE_FORMATS)}"
            )
        if self.part_file_size is not None and not (
            isinstance(self.part_file_size, (int, float)) and self.part_file_size > 0
        ):
            raise GraphqError(f"--part-file-size must be a positive number of GB, got {self.part_file_size!r}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise GraphqError(f"--accuracy-level must be 0-4 (MatMulNBits: 0 float, 1 fp32, 2 fp16, 3 bf16, 4 int8 "
                              f"activations), got {self.accuracy_level!r}")
        if self.fuse_attention and self.kv_cache:
            raise GraphqError("--fuse-attention cannot keep a quantized --kv-cache (GroupQueryAttention holds the "
                              "cache in float): drop one")
        if self.accuracy_level and self.format != "matmulnbits":
            raise GraphqError(f"--accuracy-level sets MatMulNBits' compute; --format {self.format} has none: drop one")
        if self.part_file_size is not None and "safetensors" not in self.save_format:
            raise GraphqError("--part-file-size shards the safetensors: add safetensors to --save-format")
        if not isinstance(self.disable_level, int) or isinstance(self.disable_level, bool) or self.disable_level < 0:
            raise GraphqError(f"--disable-level must be a count >= 0, got {self.disable_level!r}")
        if self.fallback_scheme is not None and self.fallback_scheme not in SCHEMES:
            raise GraphqError(f"unknown --fallback-scheme '{self.fallback_scheme}': choose one of {', '.join(SCHEMES)}")
        if self.fallback_scheme is not None and self.fallback_scheme == self.scheme:
            raise GraphqError(f"--fallback-scheme {self.fallback_scheme} is the scheme itself: choose a higher precision")
        if self.target_bits is not None:
            if not isinstance(self.target_bits, (int, float)) or isinstance(self.target_bits, bool) \
                    or not 1 <= self.target_bits <= 16:
                raise GraphqError(f"--target-bits must be a number of bits per weight in [1, 16], got {self.target_bits!r}")
            if self.disable_level:
                raise GraphqError("--target-bits and --disable-level both choose precisions from the ranking: give one")
            if self.scheme not in WEIGHT_ONLY_SCHEMES:
                raise GraphqError(f"--target-bits mixes weight-only precisions; {self.scheme} quantizes activations "
                                  "(use --disable-level with --fallback-scheme w8a16)")
        if not isinstance(self.sensitivity_windows, int) or self.sensitivity_windows < 1:
            raise GraphqError(f"sensitivity_windows must be >= 1, got {self.sensitivity_windows!r}")
        from graphq.artifacts.dtypes import SERVING_DTYPES
        from graphq.artifacts.targets import target_for

        target = target_for(self.target)
        if self.dtype is not None and self.dtype not in SERVING_DTYPES:
            raise GraphqError(f"unknown --dtype '{self.dtype}': choose one of {', '.join(SERVING_DTYPES)}")
        if self.dtype is not None:
            target.check_dtype(self.dtype)
        if self.quantize_embeddings is not None:
            if self.quantize_embeddings not in ("int8", "int4"):
                raise GraphqError(f"unknown --quantize-embeddings '{self.quantize_embeddings}': choose int8 or int4")
            if not target.embeddings:
                raise GraphqError(f"--target {self.target} has no layout for quantized embeddings: drop --quantize-embeddings")
            if self.embedding_method not in ("rtn", "gptq"):
                raise GraphqError(f"unknown --embedding-method '{self.embedding_method}': choose rtn or gptq")
            group = self.embedding_group_size
            if not isinstance(group, int) or isinstance(group, bool) or (
                group != PER_CHANNEL and (group < 16 or group & (group - 1))
            ):
                raise GraphqError(f"--embedding-group-size must be a power of two >= 16 or -1, got {group!r}")
        if self.kv_cache is not None and not target.kv_cache:
            raise GraphqError(f"--target {self.target} has no place for graphq's per-head int8 KV cache: drop --kv-cache")
        unsupported = [f for f in self.save_format if f not in target.save_formats and f != "params"]
        if unsupported:
            raise GraphqError(f"--target {self.target} writes {', '.join(target.save_formats)}, not {unsupported[0]}")
        if self.num_samples < 1 or self.seq_len < 2:
            raise GraphqError("--num-samples must be >= 1 and --seq-len >= 2")
        from graphq.sparsity_config import validate_sparsity

        validate_sparsity(self)
        self._validate_codebook()
        from graphq.kd.settings import KDSettings

        KDSettings.from_dict(self.kd)
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise GraphqError(f"unknown --device '{self.device}': choose auto, cpu or cuda (cuda:N)")
        if any(m.trains for m in resolve_methods(self.method)) and (
                self.scheme not in WEIGHT_ONLY_SCHEMES or self.weight_format != "uniform"):
            raise GraphqError(f"--method {self.method} trains the clips of uniform weight-only grids: use --scheme "
                              "w4a16 or w8a16 without --weight-format")
        return self

    def _validate_w4a8(self) -> None:
        """w4a8 / w4a8-dynamic: int4 weights rounded by a weight method of the 4-bit schemes, emitted as QDQ."""
        if "format" in getattr(self, "_given", ()) and self.format != "qdq":
            raise GraphqError(f"{self.scheme} is emitted as QDQ (DequantizeLinear int4 weights, int8 activations): "
                              f"drop --format {self.format} or use --format qdq")
        if self.prunes:
            raise GraphqError(f"{self.scheme} does not prune: --method {self.method} has a pruning method "
                              "(use rtn, awq, gptq, awq+gptq or awq+rtn)")

    @property
    def prunes(self) -> bool:
        """Some method of the sequence prunes (magnitude, wanda, sparsegpt)."""
        from graphq.weight_methods import resolve_methods

        return any(getattr(method, "prunes", False) for method in resolve_methods(self.method))

    @property
    def lowbit_error_feedback(self) -> bool:
        """W8A8S lowbit levels rounded GPTQ's way (on the smoothed model, in the weights stage) rather than to
        nearest: the method sequence rounds with error feedback (sparsegpt, or gptq after another pruner)."""
        from graphq.weight_methods import resolve_methods

        return any(method.name in ("gptq", "sparsegpt") for method in resolve_methods(self.method))

    def _check_codebook_schemes(self) -> None:
        """--weight-format known, and a codebook one only for schemes its tables serve (checked before the
        scheme's own method checks, so w8a8 with a codebook says so)."""
        from graphq.weight_methods.lut import CODEBOOK_FORMATS, WEIGHT_FORMATS

        fmt = self.weight_format
        if fmt not in WEIGHT_FORMATS:
            raise GraphqError(f"unknown --weight-format '{fmt}': choose one of {', '.join(WEIGHT_FORMATS)}")
        if fmt == "uniform":
            return
        served = [s for s in self.schemes
                  if s in WEIGHT_ONLY_SCHEMES and WEIGHT_ONLY_SCHEMES[s] in CODEBOOK_FORMATS[fmt]]
        unserved = sorted(self.schemes - set(served))
        if unserved:
            bits = " or ".join(f"w{b}a16" for b in CODEBOOK_FORMATS[fmt])
            raise GraphqError(f"--weight-format {fmt} cannot serve scheme {unserved[0]}: it writes {bits} weights")

    def _validate_codebook(self) -> None:
        """--weight-format and --method lut: a method that writes tables, groups larger than the table, a target
        that stores them."""
        from graphq.weight_methods.lut import CODEBOOK_FORMATS
        from graphq.weight_methods import resolve_methods, rounding_method

        fmt = self.weight_format
        if self.lut_table_dtype not in ("float16", "int8"):
            raise GraphqError(f"--lut-table-dtype must be float16 or int8, got {self.lut_table_dtype!r}")
        methods = resolve_methods(self.method)
        # lut learns the tables; it rounds, or gptq after it chooses the codes with error feedback (lut+gptq)
        lut_rounds = any(m.name == "lut" for m in methods) and rounding_method(methods).name in ("lut", "gptq")
        schemes = self.schemes
        if fmt == "uniform":
            if lut_rounds:
                raise GraphqError(f"--method {self.method} writes codebook weights: add --weight-format "
                                  f"{' or '.join(CODEBOOK_FORMATS)}")
            if "w3a16" in schemes:
                raise GraphqError("w3a16 has no uniform 3-bit kernel: use --weight-format lut or shared "
                                  "(or --scheme w4a16)")
            return
        if not lut_rounds:
            raise GraphqError(f"--weight-format {fmt} needs --method lut (or a sequence ending in it, e.g. awq+lut, "
                              f"or lut+gptq), not {self.method}")
        if self.format != "matmulnbits":
            raise GraphqError(f"--weight-format {fmt} is written as a lookup table (Gather + MatMul): drop --format")
        if self.symmetric is not None:
            raise GraphqError(f"--weight-format {fmt} has no zero point to choose: drop --sym / --asym")
        levels = max(1 << WEIGHT_ONLY_SCHEMES[s] for s in schemes)
        if self.group_size != PER_CHANNEL and self.group_size <= levels:
            raise GraphqError(f"--group-size {self.group_size} is too small for {levels}-entry tables: a table needs "
                              f"more than {levels} weights per group (use {levels * 2} or more, or -1 per channel)")
        if self.lut_table_dtype != "float16" and fmt != "lut":
            raise GraphqError(f"--lut-table-dtype applies to --weight-format lut; {fmt} stores its own table")
        if fmt in ("nf4", "iq4nl") and self.group_size == PER_CHANNEL:
            raise GraphqError(f"--weight-format {fmt} scales its fixed table per group: give --group-size (e.g. 64)")
        if self.prunes:
            raise GraphqError(f"--weight-format {fmt} has no exact-zero code to keep pruned weights on: drop the "
                              "pruning method (or use --weight-format uniform)")
        if self.target_bits is not None or self.disable_level or self.fallback_scheme is not None:
            raise GraphqError(f"--disable-level / --target-bits rank linears by the uniform grid's error: not with "
                              f"--weight-format {fmt}")
        from graphq.artifacts.targets import target_for

        target = target_for(self.target)
        if not target.codebook and set(self.save_format) & {"safetensors", "numpy"}:
            raise GraphqError(f"--target {self.target} has no layout for codebook (LUT) weights: use --target mindie, "
                              "or --save-format onnx")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["symmetric"] = self.is_symmetric
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise GraphqError(
                f"unknown config key(s) {', '.join(unknown)}: known keys are {', '.join(sorted(known))}"
            )
        data = dict(data)
        if "group_size" in data and isinstance(data["group_size"], str):
            if data["group_size"] not in ("-1", "per-channel", "per_channel"):
                raise GraphqError(f"group size must be an integer, got {data['group_size']!r}")
            data["group_size"] = PER_CHANNEL
        if isinstance(data.get("exclude"), str):
            data["exclude"] = [data["exclude"]]
        config = cls(**data)
        config._given = frozenset(data)  # which keys the caller set (a default format is not an explicit one)
        return config.validate()

    @classmethod
    def from_yaml(cls, path: str | Path) -> "QuantConfig":
        path = Path(path)
        if not path.is_file():
            raise GraphqError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise GraphqError(f"config file {path} is not valid YAML: {exc}".splitlines()[0]) from exc
        if not isinstance(data, dict):
            raise GraphqError(f"config file {path} must hold a mapping of option: value")
        return cls.from_dict({str(k).replace("-", "_"): v for k, v in data.items()})
