# distill_hellinger.py, in a package whose pyproject has
# [project.entry-points.distill]
# hellinger = "distill_hellinger"
import torch
import distill


class Hellinger:
    """Squared Hellinger distance between teacher and student next-token distributions."""

    name = "hellinger"

    class Params(distill.Params):  # pydantic; extra keys are rejected
        pass

    def __init__(self, params: "Hellinger.Params") -> None:
        self.params = params

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """[N, V], [N, V] -> [N] per-token values."""
        # sqrt(p) as exp(log(p) / 2): a finite gradient even where a probability is exactly 0
        sqrt_p = (0.5 * teacher_logits.log_softmax(-1)).exp()
        sqrt_q = (0.5 * student_logits.log_softmax(-1)).exp()
        return 0.5 * ((sqrt_p - sqrt_q) ** 2).sum(-1)


@distill.hookimpl
def register_divergences(register):
    register(Hellinger)
