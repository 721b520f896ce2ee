"""kd: knowledge distillation of the weight clips (and norms), decoder layer by decoder layer, in torch.

``kd`` starts from RTN; ``awq+kd`` from AWQ's folded scales and searched clips. The training is
``graphq.kd.engine``; the result is an ordinary clip per group, emitted by the same emitters as every method.
"""

from __future__ import annotations

from graphq.errors import GraphqError
from graphq.weight_methods.base import WeightMethod
from graphq.weight_methods.registry import register_weight_method

# Methods whose result kd can start from: they fold scales and/or search a clip, but keep the RTN grid's rules.
STARTS = ("awq",)


class KnowledgeDistillation(WeightMethod):
    name = "kd"
    rounds = True
    trains = True

    def check_sequence(self, names: list[str]) -> None:
        if names[-1] != self.name or any(name not in STARTS for name in names[:-1]):
            raise GraphqError(f"--method {'+'.join(names)}: kd comes last and starts from rtn (--method kd) or "
                              f"from {' or '.join(STARTS)} (--method awq+kd)")

    def train(self, job) -> None:
        from graphq.kd.engine import distill

        distill(job, [name for name in job.config.method.split("+")[:-1]])


register_weight_method(KnowledgeDistillation())
