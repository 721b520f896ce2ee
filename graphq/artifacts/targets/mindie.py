"""--target mindie: msModelSlim's V0 layout, which MindIE (atb_llm) loads.

Files: ``quant_model_weight_<t>.safetensors`` + ``quant_model_description_<t>.json`` where <t> is MindIE's scheme
name (w8a8, w8a8_dynamic, w8a16, w4a16, w8a8s, w8a8sc). The description starts with ``model_quant_type``; it
holds ``"version"`` only as msModelSlim's format version: "1.0.0" when int4 weights are packed along n (MindIE
then takes them as packed), absent for unpacked int4 (--no-pack: [n, k] int8 in [-8, 7], exactly as V0 writes).
graphq's own version goes to the safetensors metadata (``graphq_version``). config.json gets
``"quantize": "<t>"`` and ``torch_dtype`` float16 or bfloat16 (MindIE refuses float32).
"""

from __future__ import annotations

from graphq.artifacts.description import file_tag
from graphq.artifacts.targets import register_target
from graphq.artifacts.targets.msmodelslim import FORMAT_VERSION, MsModelSlimTarget


class MindieTarget(MsModelSlimTarget):
    name = "mindie"
    loaded_by = "MindIE (msModelSlim V0 layout)"
    embeddings = True  # msModelSlim's Quant_Embed
    codebook = True  # lut_mode: W4A16_LUT / W3A16_LUT / NF4 layers (graphq.artifacts.codebook)
    schemes = MsModelSlimTarget.schemes + ("w3a16",)  # 3-bit codebooks only (config refuses uniform w3a16)

    def description_name(self, scheme: str) -> str:
        return f"quant_model_description_{file_tag(scheme)}.json"

    def description_header(self, job, packed: bool, kv: bool) -> dict:
        data = {"model_quant_type": self.model_quant_type(job.collector)}
        if packed:
            data["version"] = FORMAT_VERSION
        return data

    def edit_config(self, config: dict, collector) -> dict:
        config["quantize"] = file_tag(collector.scheme)
        return self.set_dtype(config, collector)


register_target(MindieTarget())
