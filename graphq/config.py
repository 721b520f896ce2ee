"""Quantization configuration: one dataclass, loadable from YAML, validated up front."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from graphq.errors import GraphqError

#: Weight-only schemes and their weight bit width.
WEIGHT_ONLY_SCHEMES = {"w4a16": 4, "w8a16": 8}
FORMATS = ("matmulnbits", "qdq")
SAVE_FORMATS = ("onnx", "safetensors", "numpy")
METHODS = ("rtn", "awq", "gptq", "awq+gptq")
PER_CHANNEL = -1


@dataclass
class QuantConfig:
    """What to quantize and how.

    group_size: weights share one scale per ``group_size`` input channels; -1 means per output channel.
    symmetric: None picks the scheme's default (asymmetric for 4 bits, symmetric for 8 bits).
    exclude: layers whose Hugging Face name matches any pattern stay float (glob or regular expression).
    method: rtn needs no data; awq, gptq and awq+gptq calibrate layer by layer on ``calib`` (a text, JSON or JSONL
    file; the shipped Sense and Sensibility sample when None) or on ``calib_texts``.
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
    # Output: which files to write (model.onnx; safetensors + description; numpy dicts), shard size, int4 packing.
    save_format: list[str] = field(default_factory=lambda: ["onnx", "safetensors"])
    part_file_size: float | None = None
    pack: bool = True

    def group_size_for(self, in_features: int) -> int:
        """The group size for a layer with ``in_features`` inputs: a group covering all of K is per-channel (-1)."""
        return PER_CHANNEL if self.group_size == PER_CHANNEL or self.group_size >= in_features else self.group_size

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn"
    @property
    def bits(self) -> int:
        return WEIGHT_ONLY_SCHEMES[self.scheme]

    @property
    def is_symmetric(self) -> bool:
        return self.symmetric if self.symmetric is not None else self.bits == 8

    def validate(self) -> "QuantConfig":
        if self.scheme not in WEIGHT_ONLY_SCHEMES:
            raise GraphqError(
                f"unknown scheme '{self.scheme}': choose one of {', '.join(WEIGHT_ONLY_SCHEMES)}"
            )
        if self.format not in FORMATS:
            raise GraphqError(f"unknown format '{self.format}': choose one of {', '.join(FORMATS)}")
        if self.method not in METHODS:
            raise GraphqError(f"unknown method '{self.method}': choose one of {', '.join(METHODS)}")
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
        if self.part_file_size is not None and "safetensors" not in self.save_format:
            raise GraphqError("--part-file-size shards the safetensors: add safetensors to --save-format")
        if self.num_samples < 1 or self.seq_len < 2:
            raise GraphqError("--num-samples must be >= 1 and --seq-len >= 2")
        return self

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
        return cls(**data).validate()

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
        return cls.from_dict({k.replace("-", "_"): v for k, v in data.items()})
