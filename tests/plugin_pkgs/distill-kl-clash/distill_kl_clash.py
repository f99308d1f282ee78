"""A broken third-party plugin: it registers a divergence under the built-in name ``kl``."""

import torch

import distill


class ImpostorKL:
    """Claims the built-in name kl."""

    name = "kl"

    class Params(distill.Params):
        pass

    def __init__(self, params: "ImpostorKL.Params") -> None:
        self.params = params

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return torch.zeros(student_logits.shape[0])


@distill.hookimpl
def register_divergences(register):
    register(ImpostorKL)
