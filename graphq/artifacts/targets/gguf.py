"""--target gguf: a GGUF file (``model.gguf``) for llama.cpp, the most used edge runtime, written with the ``gguf``
package.

Weights go into ggml's blocks of 32 along k: Q8_0 (fp16 d, 32 int8: w = q d), Q4_0 (fp16 d, 16 bytes of nibbles:
w = (q - 8) d) and Q4_1 (fp16 d and m: w = q d + m); nibble j of a block sits in byte j's low half for j < 16 and
byte j - 16's high half otherwise. Where graphq's grid is ggml's (group 32 along k, k a multiple of 32), the blocks
hold graphq's own integers: W8A16 symmetric -> Q8_0, W4A16 symmetric -> Q4_0, W4A16 asymmetric -> Q4_1 with
m = -z d; graphq's scales are rounded to fp16 before the layer is emitted, so the ONNX computes what the file
holds, except Q4_1's m, which is -z d rounded to fp16 (one fp16 rounding per block). Anything else (other group
sizes, per channel, asymmetric 8 bits) is re-rounded by the gguf package from graphq's dequantized weights
(Q8_0, or Q4_0 / Q4_1), and report.json's ``gguf`` entry lists those layers. W8A8 schemes are refused: llama.cpp
quantizes activations itself.

Tensor names follow llama.cpp (``gguf.TensorNameMap``); LLaMA's q_proj / k_proj rows are permuted as
llama.cpp's converter does (its rotary layout interleaves each head's halves). Float tensors are written in the
serving dtype (F32, F16, BF16). The header carries the architecture's hyperparameters from config.json and, for
byte-level BPE tokenizers (tokenizer.json), the vocabulary, merges and special token ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from graphq.algorithms.rtn import QuantizedWeight
from graphq.artifacts.dtypes import numpy_dtype
from graphq.artifacts.naming import float_tensor_sources
from graphq.artifacts.targets import ArtifactTarget, WriteJob, register_target
from graphq.errors import GraphqError

BLOCK = 32
FILE_NAME = "model.gguf"
ARCHITECTURES = {"llama": "LLAMA", "qwen2": "QWEN2", "mistral": "LLAMA"}


def _gguf():
    import gguf

    return gguf


def grid_matches(qw: QuantizedWeight) -> bool:
    """graphq's integers are ggml's block codes: groups of 32 along k, k a multiple of 32, and a ggml type for
    the bits and symmetry (Q8_0 has no zero point)."""
    k = qw.shape[0]
    return qw.group_size == BLOCK and k % BLOCK == 0 and (qw.bits == 4 or qw.symmetric)


def gguf_type_name(qw: QuantizedWeight) -> str:
    if qw.bits == 8:
        return "Q8_0"
    return "Q4_0" if qw.symmetric else "Q4_1"


def encode_blocks(qw: QuantizedWeight) -> np.ndarray:
    """graphq's integers and fp16-exact scales -> ggml block bytes, uint8 [n, k / 32 * block_bytes]."""
    k, n = qw.shape
    blocks = k // BLOCK
    scales = np.ascontiguousarray(qw.scales.T.astype(np.float16))  # [n, blocks]
    if qw.bits == 8:
        codes = qw.q.T.astype(np.int8).reshape(n, blocks, BLOCK)
        out = np.empty((n, blocks, 34), dtype=np.uint8)
        out[:, :, 0:2] = scales.view(np.uint8).reshape(n, blocks, 2)
        out[:, :, 2:] = codes.view(np.uint8)
        return out.reshape(n, -1)
    half = 8
    if qw.symmetric:
        codes = (qw.q.T.astype(np.int16) + half).astype(np.uint8)  # [-8, 7] -> [0, 15]
    else:
        codes = qw.q.T.astype(np.uint8)
    codes = codes.reshape(n, blocks, BLOCK)
    nibbles = codes[:, :, :16] | (codes[:, :, 16:] << 4)
    if qw.symmetric:
        out = np.empty((n, blocks, 18), dtype=np.uint8)
        out[:, :, 0:2] = scales.view(np.uint8).reshape(n, blocks, 2)
        out[:, :, 2:] = nibbles
        return out.reshape(n, -1)
    minimum = np.ascontiguousarray((-(qw.zero_points.T.astype(np.float32)) * qw.scales.T.astype(np.float32)).astype(np.float16))
    out = np.empty((n, blocks, 20), dtype=np.uint8)
    out[:, :, 0:2] = scales.view(np.uint8).reshape(n, blocks, 2)
    out[:, :, 2:4] = minimum.view(np.uint8).reshape(n, blocks, 2)
    out[:, :, 4:] = nibbles
    return out.reshape(n, -1)


def llama_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter permutation of q_proj / k_proj output rows (any trailing shape, e.g. block bytes)."""
    n = rows.shape[0]
    return rows.reshape(heads, 2, n // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


class GgufTarget(ArtifactTarget):
    name = "gguf"
    loaded_by = "llama.cpp (and every GGUF runtime)"
    schemes = ("w4a16", "w8a16")
    embeddings = True  # token_embd in Q4_0 / Q4_1 / Q8_0, as llama.cpp quantizes it

    def check(self, layer_schemes, group_sizes, symmetric, shapes=None) -> None:
        super().check(layer_schemes, group_sizes, symmetric, shapes)
        for name, (n, k) in (shapes or {}).items():
            if layer_schemes.get(name, "float") != "float" and k % BLOCK:
                raise GraphqError(f"--target gguf stores weights in blocks of {BLOCK}: {name} has {k} inputs")

    def prepare(self, qw, details, serving_dtype):
        if not grid_matches(qw):
            return qw, details
        scales = qw.scales.astype(np.float16).astype(np.float32)  # ggml's d is fp16
        return QuantizedWeight(q=qw.q, scales=scales, zero_points=qw.zero_points, bits=qw.bits,
                               group_size=qw.group_size), details

    def encode_layer(self, collector, layer, qw, details, scheme) -> dict[str, np.ndarray]:
        gguf = _gguf()
        if grid_matches(qw):
            kind = gguf_type_name(qw)
            blocks = encode_blocks(qw)
            exact = np.array(1, dtype=np.uint8)
        else:  # re-rounded by the gguf package from graphq's dequantized weight
            kind = "Q8_0" if qw.bits == 8 else ("Q4_0" if qw.symmetric else "Q4_1")
            weight = np.ascontiguousarray(qw.dequantize().T.astype(np.float32))
            blocks = gguf.quants.quantize(weight, gguf.GGMLQuantizationType[kind])
            exact = np.array(0, dtype=np.uint8)
        tensors = {"blocks": blocks, "type": np.frombuffer(kind.encode().ljust(8), dtype=np.uint8).copy(), "exact": exact}
        if layer.bias is not None:
            tensors["bias"] = layer.bias.const_value.numpy().astype(np.float32)
        return tensors

    def write(self, job: WriteJob) -> list[Path]:
        gguf = _gguf()
        collector = job.collector
        config_file = job.out_dir / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        model_type = config.get("model_type")
        if model_type not in ARCHITECTURES:
            raise GraphqError(f"--target gguf knows the architectures {', '.join(ARCHITECTURES)}, not {model_type!r} "
                              "(config.json model_type)")
        arch = gguf.MODEL_ARCH[ARCHITECTURES[model_type]]
        blocks_count = int(config["num_hidden_layers"])
        names = gguf.get_tensor_name_map(arch, blocks_count)
        heads, kv_heads = int(config["num_attention_heads"]), int(config.get("num_key_value_heads") or config["num_attention_heads"])
        path = job.out_dir / FILE_NAME
        writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
        self._write_header(writer, gguf, config, job)

        def gguf_name(hf_name: str) -> str:
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise GraphqError(f"--target gguf has no llama.cpp name for {hf_name}")
            return name

        def permuted(hf_name: str, rows: np.ndarray) -> np.ndarray:
            if arch != gguf.MODEL_ARCH.LLAMA:
                return rows
            if ".q_proj." in hf_name:
                return llama_permute(rows, heads)
            if ".k_proj." in hf_name:
                return llama_permute(rows, kv_heads)
            return rows

        serving = collector.serving_dtype()
        float_types = {"fp32": (np.float32, gguf.GGMLQuantizationType.F32),
                       "fp16": (np.float16, gguf.GGMLQuantizationType.F16),
                       "bf16": (np.uint16, gguf.GGMLQuantizationType.BF16)}
        store_dtype, store_type = float_types[serving]
        floats = float_tensor_sources(job.model, job.layers, collector.quantized_names())
        for hf_name, source in floats.items():
            array = source.array()
            # Norms and biases stay float32, as llama.cpp's converter keeps 1-D tensors.
            if array.ndim == 1:
                writer.add_tensor(gguf_name(hf_name), permuted(hf_name, array.astype(np.float32)))
                continue
            typed = array.astype(numpy_dtype(serving))
            if serving == "bf16":
                typed = typed.view(np.uint16)
            writer.add_tensor(gguf_name(hf_name), permuted(hf_name, np.ascontiguousarray(typed.astype(store_dtype))),
                              raw_dtype=store_type)
        report: dict[str, dict] = {}
        for name in collector.layers:
            tensors = collector.layer_tensors(name)
            kind = bytes(tensors["type"]).decode().strip()
            blocks = np.ascontiguousarray(permuted(f"{name}.weight", np.asarray(tensors["blocks"])))
            writer.add_tensor(gguf_name(f"{name}.weight"), blocks, raw_dtype=gguf.GGMLQuantizationType[kind])
            if "bias" in tensors:
                writer.add_tensor(gguf_name(f"{name}.bias"), permuted(f"{name}.bias", np.asarray(tensors["bias"])))
            report[name] = {"type": kind, "codes": "graphq" if int(tensors["exact"]) else "re-rounded by gguf"}
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        collector.target_report = {"file": FILE_NAME, "layers": report}
        return [path]

    def _write_header(self, writer, gguf, config: dict, job: WriteJob) -> None:
        writer.add_name(str(config.get("_name_or_path") or config.get("_model_name_or_path") or "graphq model"))
        writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
        writer.add_embedding_length(int(config["hidden_size"]))
        writer.add_block_count(int(config["num_hidden_layers"]))
        writer.add_feed_forward_length(int(config["intermediate_size"]))
        writer.add_head_count(int(config["num_attention_heads"]))
        writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
        head_dim = config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"])
        writer.add_rope_dimension_count(int(head_dim))
        writer.add_vocab_size(int(config["vocab_size"]))
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if "w4a16" in job.collector.layer_schemes.values()
                             else gguf.LlamaFileType.MOSTLY_Q8_0)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_string("graphq.version", job.version)
        self._write_tokenizer(writer, gguf, job.out_dir, config)

    def _write_tokenizer(self, writer, gguf, folder: Path, config: dict) -> None:
        """Byte-level BPE (GPT-2 style) vocabularies, as llama.cpp's converter writes them; others are skipped
        (the file then needs a tokenizer from elsewhere, said in the report)."""
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            return
        data = json.loads(tokenizer_file.read_text())
        model = data.get("model", {})
        if model.get("type") != "BPE":
            return
        vocab = dict(model.get("vocab", {}))
        added = {token["content"]: token for token in data.get("added_tokens", [])}
        for content, token in added.items():
            vocab.setdefault(content, token["id"])
        size = max(int(config.get("vocab_size", 0)), max(vocab.values()) + 1)
        tokens = [f"[PAD{i}]" for i in range(size)]
        types = [gguf.TokenType.UNUSED] * size
        for token, index in vocab.items():
            tokens[index] = token
            special = added.get(token, {}).get("special", False)
            types[index] = gguf.TokenType.CONTROL if special else gguf.TokenType.NORMAL
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        merges = model.get("merges", [])
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
        for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                         ("pad_token_id", writer.add_pad_token_id)):
            if isinstance(config.get(key), int):
                add(config[key])


register_target(GgufTarget())
