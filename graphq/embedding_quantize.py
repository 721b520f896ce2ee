"""The --quantize-embeddings step of quantize: the token embedding (and a tied lm_head) on an integer grid.

Runs before the linears are quantized, so calibrated methods see the quantized embedding's outputs. The
embedding goes into the artifacts as a W4A16 / W8A16 "layer" named after its module (``model.embed_tokens``:
``weight`` [vocab, hidden], ``weight_scale`` / ``weight_offset`` [vocab, groups]) in the target's layout; a tied
lm_head is emitted with the same integers and is not stored again (Hugging Face ties it on load).
"""

from __future__ import annotations

from graphq.config import QuantConfig
from graphq.errors import GraphqError
from graphq.linear_layers import LinearLayer
from graphq.passes.embedding import BITS, Embedding, emit_embedding, find_embedding, quantize_embedding, tied_lm_head
from graphq.passes.emitters import emitter_for

TIED_REASON = "tied to the embedding: quantized with it (--quantize-embeddings)"


def plan_embedding(model, layers: list[LinearLayer], config: QuantConfig) -> tuple[Embedding | None, LinearLayer | None]:
    """(the embedding, its tied lm_head or None) when --quantize-embeddings is on; refuses a model without one."""
    if not config.quantize_embeddings:
        return None, None
    embedding = find_embedding(model)
    if embedding is None:
        raise GraphqError("--quantize-embeddings found no token embedding (a Gather of a constant [vocab, hidden] "
                          "table named <module>.weight) in the model")
    return embedding, tied_lm_head(layers, embedding)


def scheme_of(config: QuantConfig) -> str:
    return "w4a16" if BITS[config.quantize_embeddings] == 4 else "w8a16"


def quantize_embedding_step(model, embedding: Embedding, tied: LinearLayer | None, config: QuantConfig, target,
                            serving_dtype: str, collector) -> dict:
    """Quantize, emit and collect the embedding (and emit a tied lm_head); returns report["embedding"]."""
    bits = BITS[config.quantize_embeddings]
    symmetric = bits == 8 if config.embedding_symmetric is None else config.embedding_symmetric
    qw = quantize_embedding(embedding, bits, config.embedding_group_size, symmetric)
    qw, _ = target.prepare(qw, {}, serving_dtype)
    format = config.format if config.scheme not in ("w8a8", "w8a8-dynamic") else "qdq"
    emit_embedding(model, embedding, qw, format)
    if collector is not None:
        collector.add(embedding, qw, {}, scheme=scheme_of(config))
        if tied is not None:
            collector.tied.add(tied.name)
    entry = {"name": embedding.name, "bits": bits, "group_size": qw.group_size, "symmetric": symmetric,
             "format": "GatherBlockQuantized" if format == "matmulnbits" else "DequantizeLinear + Gather",
             "weight_bytes_before": int(embedding.in_features * embedding.out_features * embedding.dtype.itemsize),
             "weight_bytes_after": embedding.in_features * embedding.out_features * bits // 8 + qw.scales.size * 4,
             "tied_lm_head": tied is not None}
    if tied is not None:
        entry["lm_head_output"] = emitter_for(scheme_of(config), format).emit(model, tied, qw, {})
    return entry
