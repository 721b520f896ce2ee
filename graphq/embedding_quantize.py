"""The --quantize-embeddings step of quantize: the token embedding (and a tied lm_head) on an integer grid.

Runs before the linears are quantized, so calibrated methods see the quantized embedding's outputs. The
embedding goes into the artifacts as a W4A16 / W8A16 "layer" named after its module (``model.embed_tokens``:
``weight`` [vocab, hidden], ``weight_scale`` / ``weight_offset`` [vocab, groups]) in the target's layout; a tied
lm_head is emitted with the same integers and is not stored again (Hugging Face ties it on load).
"""

from __future__ import annotations

from typing import Callable

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


def gptq_for_tied_lm_head(model, embedding: Embedding, tied: LinearLayer, bits: int, group: int, symmetric: bool,
                          samples: list, damp: float) -> tuple:
    """GPTQ of the shared table against the lm_head's input Hessian (the final norm's outputs on the calibration
    samples): the integers then preserve the logits, where int4 error costs most; the embedding gathers the same
    integers (its rows enter a norm, which forgives more). Returns (QuantizedWeight, report entry)."""
    from graphq.algorithms.gptq import HessianAccumulator, gptq_quantize
    from graphq.runtimes.activation_capture import ActivationCapture

    capture = ActivationCapture(model, [tied])
    hessian = HessianAccumulator(tied.in_features)
    for ids in samples:
        hessian.add(capture.run(ids)[tied.input.name])
    del capture
    table_t = embedding.weight.const_value.numpy().astype("float32").T.copy()  # [hidden, vocab] = the lm_head's W
    qw, info = gptq_quantize(table_t, hessian.hessian(), bits, group if group != -1 else tied.in_features, symmetric,
                             damp=damp, n_samples=hessian.tokens)
    return qw, {"method": "gptq (lm_head inputs)", "calibration_tokens": hessian.tokens, **{
        k: v for k, v in info.items() if isinstance(v, (int, float, str))}}


def quantize_embedding_step(model, embedding: Embedding, tied: LinearLayer | None, config: QuantConfig, target,
                            serving_dtype: str, collector, load_samples: Callable[[], list] | None = None) -> dict:
    """Quantize, emit and collect the embedding (and emit a tied lm_head); returns report["embedding"]."""
    bits = BITS[config.quantize_embeddings]
    symmetric = bits == 8 if config.embedding_symmetric is None else config.embedding_symmetric
    method = {"method": "rtn"}
    if config.embedding_method == "gptq":
        if tied is None:
            raise GraphqError("--embedding-method gptq calibrates the tied lm_head's inputs, but this model's lm_head "
                              "is not tied to the embedding: use --embedding-method rtn")
        qw, method = gptq_for_tied_lm_head(model, embedding, tied, bits, config.embedding_group_size, symmetric,
                                           load_samples(), config.damp)
    else:
        qw = quantize_embedding(embedding, bits, config.embedding_group_size, symmetric)
    qw, _ = target.prepare(qw, {}, serving_dtype)
    format = config.format if config.scheme not in ("w8a8", "w8a8-dynamic", "w4a8", "w4a8-dynamic") else "qdq"
    emit_embedding(model, embedding, qw, format)
    if collector is not None:
        collector.add(embedding, qw, {}, scheme=scheme_of(config))
        if tied is not None:
            collector.tied.add(tied.name)
    entry = {"name": embedding.name, **method, "bits": bits, "group_size": qw.group_size, "symmetric": symmetric,
             "format": "GatherBlockQuantized" if format == "matmulnbits" else "DequantizeLinear + Gather",
             "weight_bytes_before": int(embedding.in_features * embedding.out_features * embedding.dtype.itemsize),
             "weight_bytes_after": embedding.in_features * embedding.out_features * bits // 8 + qw.scales.size * 4,
             "tied_lm_head": tied is not None}
    if tied is not None:
        entry["lm_head_output"] = emitter_for(scheme_of(config), format).emit(model, tied, qw, {})
    return entry
