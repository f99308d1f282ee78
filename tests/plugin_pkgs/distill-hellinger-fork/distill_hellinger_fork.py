"""A second package that also registers a divergence named ``hellinger``."""

import torch

import distill


class HellingerFork:
    """Another squared Hellinger distance."""

    name = "hellinger"

    class Params(distill.Params):
        pass

    def __init__(self, params: "HellingerFork.Params") -> None:
        self.params = params

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        log_p, log_q = teacher_logits.log_softmax(-1), student_logits.log_softmax(-1)
        return 1.0 - (0.5 * (log_p + log_q)).exp().sum(-1)


@distill.hookimpl
def register_divergences(register):
    register(HellingerFork)
