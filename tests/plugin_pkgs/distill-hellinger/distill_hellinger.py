# distill_hellinger.py, in a package whose pyproject has
# [project.entry-points.distill]
# hellinger = "distill_hellinger"
import torch
import distill

class Hellinger:
    """Squared Hellinger distance between teacher and student next-token distributions."""
    name = "hellinger"

    class Params(distill.Params):      # pydantic; extra keys are rejected
        pass

    def __init__(self, params: "Hellinger.Params") -> None:
        self.params = params

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """[N, V], [N, V] -> [N] per-token values."""
        p = teacher_logits.float().softmax(-1)
        q = student_logits.float().softmax(-1)
        return 0.5 * ((p.sqrt() - q.sqrt()) ** 2).sum(-1)

@distill.hookimpl
def register_divergences(register):
    register(Hellinger)
