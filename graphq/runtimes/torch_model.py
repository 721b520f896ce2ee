"""The Hugging Face torch model of an export folder, rebuilt from its config.json and the ONNX graph's weights.

A user who holds only the export (no Hugging Face checkpoint) can still train in torch: every tensor the decoder
needs is in the graph under its Hugging Face name (the exporter keeps the names of norms and embeddings; linear
layers are named by ``find_linear_layers``). Weights the exporter deduplicated are reached through Identity nodes
whose outputs carry the Hugging Face names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx_ir as ir

from graphq.errors import GraphqError
from graphq.linear_layers import LinearLayer

_DECODER_LAYER = re.compile(r"^(.*?(?:layers|h|blocks|layer)\.(\d+))\.")


def named_graph_tensors(model: ir.Model) -> dict[str, np.ndarray]:
    """Constant tensors by name: initializers, and Identity outputs of initializers (deduplicated weights)."""
    tensors = {name: value for name, value in model.graph.initializers.items() if value.const_value is not None}
    for node in model.graph:
        if node.op_type == "Identity" and node.inputs[0] is not None and node.inputs[0].name in tensors:
            tensors.setdefault(node.outputs[0].name, tensors[node.inputs[0].name])
    return {name: value.const_value for name, value in tensors.items()}


def hf_tensors(model: ir.Model, layers: list[LinearLayer]) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """(Hugging Face parameter name, loader of its float32 array) for every tensor the graph holds under such a
    name; linear weights load as [out, in], as nn.Linear holds them. Loaders let the caller hold one copy at a time."""
    def constant(tensor) -> Callable[[], np.ndarray]:
        return lambda: np.array(tensor.numpy(), dtype=np.float32)  # a copy: training writes the norms in place

    for name, tensor in named_graph_tensors(model).items():
        if not name.startswith("onnx::") and "." in name:
            yield name, constant(tensor)
    for layer in layers:
        yield f"{layer.name}.weight", lambda layer=layer: np.array(layer.weight_kn().T, dtype=np.float32, order="C")
        if layer.bias is not None:
            yield f"{layer.name}.bias", lambda layer=layer: layer.bias_array().copy()
        if layer.norm_weight is not None and layer.producer_name:
            yield f"{layer.producer_name}.weight", constant(layer.norm_weight.const_value)


def decoder_layer_path(linear_name: str) -> tuple[str, int] | None:
    """'model.layers.3.mlp.down_proj' -> ('model.layers.3', 3); None outside the decoder layers (lm_head)."""
    match = _DECODER_LAYER.match(linear_name)
    return (match.group(1), int(match.group(2))) if match else None


def _parameter_owners(torch_model) -> dict[str, tuple[Any, str]]:
    """Parameter name -> (module holding it, attribute), tied parameters under each of their names."""
    modules = dict(torch_model.named_modules(remove_duplicate=False))
    owners = {}
    for name, _ in torch_model.named_parameters(remove_duplicate=False):
        parent, _, attribute = name.rpartition(".")
        owners[name] = (modules[parent], attribute)
    return owners


def empty_torch_model(model_dir: Path):
    """The Hugging Face model of ``model_dir``'s config.json (fp32, sdpa, no KV cache) with every parameter on the
    meta device: no weight is allocated or drawn (buffers such as rotary frequencies are computed on the CPU)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.accelerate import init_empty_weights

    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise GraphqError(f"{model_dir} has no config.json: the torch stage rebuilds the model from it "
                          "(export with 'graphq export', which writes it)")
    try:
        hf_config = AutoConfig.from_pretrained(model_dir)
    except Exception as exc:  # transformers raises many types for unknown architectures
        raise GraphqError(f"{config_file} names a model transformers cannot build ({str(exc).splitlines()[0]})") from exc
    hf_config.use_cache = False
    with init_empty_weights(include_buffers=False):
        torch_model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa", dtype=torch.float32)
    return torch_model.eval()


def load_graph_weights(torch_model, model: ir.Model, layers: list[LinearLayer],
                       select: Callable[[str], bool] = lambda name: True) -> set[str]:
    """Give every parameter whose name ``select`` accepts the graph's tensor of that name (a float32 copy), read
    now; returns the names loaded. Tied parameters share the loaded tensor only after ``tie_weights``."""
    import torch
    from torch import nn

    owners = _parameter_owners(torch_model)
    found: set[str] = set()
    for name, load in hf_tensors(model, layers):
        if name not in owners or name in found or not select(name):
            continue
        module, attribute = owners[name]
        current = getattr(module, attribute)
        array = load()
        if tuple(array.shape) != tuple(current.shape):
            raise GraphqError(f"the graph's {name} has shape {tuple(array.shape)}, config.json implies "
                              f"{tuple(current.shape)}: the export and its config.json do not match")
        module._parameters[attribute] = nn.Parameter(torch.from_numpy(array), requires_grad=current.requires_grad)
        found.add(name)
    return found


def release_weights(module) -> None:
    """Drop the module's parameters and buffers to the meta device (their memory is freed once unreferenced)."""
    module.to("meta")


def to_device(module, device: str):
    """``module.to(device)`` for the tensors that are loaded; those on the meta device stay there."""
    return module._apply(lambda t: t if t.is_meta else t.to(device))


def build_torch_model(model_dir: Path, model: ir.Model, layers: list[LinearLayer], decoder_weights: bool = True):
    """The float torch model (eval mode, fp32, no KV cache) whose decoder weights are the graph's.

    Every parameter of the decoder layers and the token embedding must be found in the graph; the final norm and
    lm_head may be missing (layer-by-layer training never computes logits; they are left at zero).
    ``decoder_weights=False`` leaves the decoder layers' parameters (and an untied lm_head) on the meta device
    for the caller to load one layer at a time (``load_graph_weights``), so the model is never held whole."""
    import torch

    torch_model = empty_torch_model(model_dir)
    hf_config = torch_model.config
    names = set(_parameter_owners(torch_model))
    available = {name for name, _ in hf_tensors(model, layers)}  # names only: nothing is read yet
    needed = [name for name in names if re.search(r"(?:layers|h|blocks|layer)\.\d+\.|embed", name)]
    missing = [name for name in needed if name not in available]
    if missing:
        raise GraphqError(f"the graph has no tensor for {missing[0]} ({len(missing)} missing): the torch stage needs "
                          "every decoder weight under its Hugging Face name (re-export with 'graphq export')")
    if decoder_weights:
        load_graph_weights(torch_model, model, layers)
    else:
        output = torch_model.get_output_embeddings()
        skip = {f"{name}." for name, module in torch_model.named_modules() if module is output}
        load_graph_weights(torch_model, model, layers, lambda name: decoder_layer_path(name) is None
                           and not any(name.startswith(prefix) for prefix in skip))
    if getattr(hf_config, "tie_word_embeddings", False):
        torch_model.tie_weights()
    if decoder_weights:
        for module, attribute in _parameter_owners(torch_model).values():
            current = getattr(module, attribute)
            if current.is_meta:  # not in the graph (a final norm or lm_head the export dropped)
                module._parameters[attribute] = torch.nn.Parameter(torch.zeros(current.shape, dtype=current.dtype),
                                                                   requires_grad=current.requires_grad)
    return torch_model.eval()


def decoder_layers(torch_model) -> Any:
    """The model's ModuleList of decoder layers."""
    base = getattr(torch_model, torch_model.base_model_prefix, torch_model)
    for attribute in ("layers", "h", "blocks"):
        if hasattr(base, attribute):
            return getattr(base, attribute)
    raise GraphqError(f"{type(torch_model).__name__} has no list of decoder layers (layers, h or blocks)")


class _Caught(Exception):
    pass


def first_layer_inputs(torch_model, token_ids: "torch.Tensor") -> tuple["torch.Tensor", dict]:
    """The hidden states entering decoder layer 0 for ``token_ids`` [B, T], and the keyword arguments the model
    passes every layer (rotary embeddings, masks, positions), caught at layer 0 without running the rest."""
    import torch

    layer0 = decoder_layers(torch_model)[0]
    caught: dict = {}

    def catch(module, args, kwargs):
        caught["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        caught["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Caught

    handle = layer0.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            torch_model(input_ids=token_ids, use_cache=False)
    except _Caught:
        pass
    finally:
        handle.remove()
    if "hidden" not in caught:
        raise GraphqError("the torch model never reached its first decoder layer")
    return caught["hidden"], caught["kwargs"]


def run_layer(layer, hidden: "torch.Tensor", kwargs: dict) -> "torch.Tensor":
    """One decoder layer's output hidden states (layers return a tensor or a tuple, depending on the version)."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out
