"""--target vllm-ascend: msModelSlim's ascendV1 layout, which vllm-ascend loads (``--quantization ascend``).

Files: ``quant_model_weight_<t>.safetensors`` + ``quant_model_description.json`` with ``"version": "1.0.0"``,
``model_quant_type`` and ``group_size`` (0 per channel) first. config.json keeps no ``quantization_config`` (and
no ``quantize``): vllm-ascend finds the description file itself. Refused, because vllm-ascend has no kernel for
them: W4A16 dense linears (its W4A16 is for MoE experts), W8A16 with groups or zero points, groups other than
64 / 128, and q/k/v or gate/up of one decoder layer with different schemes (it fuses them into one linear).
"""

from __future__ import annotations

from graphq.artifacts.targets import register_target
from graphq.artifacts.targets.msmodelslim import FORMAT_VERSION, MsModelSlimTarget
from graphq.errors import GraphqError

DESCRIPTION = "quant_model_description.json"
GROUP_SIZES = (64, 128)
_FUSED = {"q_proj": "q/k/v", "k_proj": "q/k/v", "v_proj": "q/k/v", "gate_proj": "gate/up", "up_proj": "gate/up"}


class VllmAscendTarget(MsModelSlimTarget):
    name = "vllm-ascend"
    loaded_by = "vllm-ascend (msModelSlim ascendV1 layout)"

    def check(self, layer_schemes: dict[str, str], group_sizes: dict[str, int], symmetric: dict[str, bool],
              shapes: dict[str, tuple[int, int]] | None = None) -> None:
        super().check(layer_schemes, group_sizes, symmetric, shapes)
        for name, scheme in layer_schemes.items():
            group = group_sizes.get(name, -1)
            if scheme == "w4a16":
                raise GraphqError(f"--target vllm-ascend cannot serve W4A16 dense linears ({name}): its W4A16 kernels "
                                  "are for MoE experts; use --scheme w8a16 / w8a8-dynamic or --target mindie")
            if scheme == "w4a8":
                raise GraphqError(f"--target vllm-ascend has no static W4A8 linear ({name}): it serves W4A8_DYNAMIC; "
                                  "use --scheme w4a8-dynamic or --target mindie")
            if scheme == "w8a16" and (group != -1 or not symmetric.get(name, True)):
                raise GraphqError(f"--target vllm-ascend serves W8A16 per channel and symmetric only ({name} is "
                                  f"{'group ' + str(group) if group != -1 else 'asymmetric'}): use --group-size -1 --sym")
            if group != -1 and group not in GROUP_SIZES:
                raise GraphqError(f"--target vllm-ascend supports group sizes 64 and 128, not {group} ({name})")
            if scheme == "w4a8-dynamic" and group != -1 and shapes and shapes[name][1] % group:
                raise GraphqError(f"--target vllm-ascend reads in_features / group second-level scales, but {name} has "
                                  f"{shapes[name][1]} input channels, which group size {group} does not divide: "
                                  "choose a group size that divides it (or -1)")
        fused: dict[tuple[str, str], dict[str, str]] = {}
        for name, scheme in layer_schemes.items():
            prefix, _, module = name.rpartition(".")
            if module in _FUSED:
                fused.setdefault((prefix, _FUSED[module]), {})[name] = scheme
        for (prefix, kind), members in fused.items():
            if len(set(members.values())) > 1:
                listed = ", ".join(f"{n.rsplit('.', 1)[1]} {s}" for n, s in sorted(members.items()))
                raise GraphqError(f"--target vllm-ascend fuses {kind} into one linear, but {prefix} has {listed}: "
                                  "give them one scheme")

    def description_name(self, scheme: str) -> str:
        return DESCRIPTION

    def description_header(self, job, packed: bool, kv: bool) -> dict:
        groups = {g for g in job.collector.layer_group_sizes.values() if g != -1}
        return {"version": FORMAT_VERSION, "model_quant_type": self.model_quant_type(job.collector),
                "group_size": max(groups) if groups else 0}

    def edit_config(self, config: dict, collector) -> dict:
        config.pop("quantization_config", None)
        config.pop("quantize", None)
        return self.set_dtype(config, collector)


register_target(VllmAscendTarget())
