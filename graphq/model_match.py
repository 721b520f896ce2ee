"""Do two models belong together? Checked before compare / verify spend minutes running them.

compare takes any two models of one vocabulary. verify needs more: QUANT must be a quantization of FLOAT. graphq
never rewrites the token embedding, so a quantization carries the float model's embedding table unchanged; a
different table means another export (or the arguments in the wrong order).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphq.errors import GraphqError


def logits_vocabulary(session) -> int | None:
    """The vocabulary size an onnxruntime session's ``logits`` output declares (None when it is symbolic)."""
    for output in session.get_outputs():
        if output.name == "logits" and output.shape and isinstance(output.shape[-1], int):
            return output.shape[-1]
    return None


def check_same_vocabulary(reference_path: str | Path, reference_session, candidate_path: str | Path, candidate_session) -> None:
    """Refuse two models whose logits cover different vocabularies: their distributions cannot be compared."""
    ref, cand = logits_vocabulary(reference_session), logits_vocabulary(candidate_session)
    if ref is not None and cand is not None and ref != cand:
        raise GraphqError(
            f"{reference_path} has a vocabulary of {ref} tokens but {candidate_path} has {cand}: "
            "compare models of the same tokenizer"
        )


def embedding_table(model: ir.Model) -> ir.Value | None:
    """The constant table gathered by input_ids (the token embedding), if the graph has one."""
    for node in model.graph:
        if node.op_type == "Gather" and len(node.inputs) == 2 and node.inputs[1] is not None:
            table, ids = node.inputs
            if ids.name == "input_ids" and table is not None and table.const_value is not None:
                return table
    return None


def check_quantized_from(
    float_model: ir.Model, quant_model: ir.Model, float_file: Path, quant_file: Path, float_linears: int, quant_linears: int
) -> None:
    """Refuse, by name, FLOAT and QUANT given in the wrong order, and a QUANT made from another export.

    ``float_linears`` / ``quant_linears``: how many float linear layers each graph has (quantizing only removes some).
    """
    if quant_linears > float_linears:
        raise GraphqError(
            f"{float_file} has fewer float linear layers ({float_linears}) than {quant_file} ({quant_linears}): "
            "FLOAT and QUANT look swapped; pass the float export first, then the quantized model"
        )
    float_table, quant_table = embedding_table(float_model), embedding_table(quant_model)
    if float_table is None or quant_table is None:
        return
    float_shape, quant_shape = tuple(float_table.shape), tuple(quant_table.shape)
    if float_shape != quant_shape:
        raise GraphqError(
            f"{quant_file}'s token embedding is {list(quant_shape)} but {float_file}'s is {list(float_shape)}: "
            "it is not a quantization of this float model (another vocabulary or size)"
        )
    a = float_table.const_value.numpy().astype(np.float32)
    b = quant_table.const_value.numpy().astype(np.float32)
    if not np.allclose(a, b, rtol=1e-2, atol=1e-3):  # tolerant of an fp16 copy of the same weights
        raise GraphqError(
            f"{quant_file} was not quantized from {float_file}: their token embeddings differ "
            "(pass the float export it was made from; report.json's source_model names it)"
        )
