"""``distill run`` with probes, in every process of an ``accelerate launch``;
``tests/test_rank_agreement.py`` runs it.

    accelerate launch ... tests/rank_probe.py PROBE_DIR [--miss-on-rank R] -- <distill run arguments>

Each process counts its teacher forwards after the set-up (a hook on the teacher's first decoder
layer, which every teacher pass goes through, fused or not) and records the token ids of every response the student
generates; it writes them to ``PROBE_DIR/rank-<i>.json`` when the run ends. ``--miss-on-rank R``:
on process R, the teacher cache answers no training micro-batch of the first step (as if it lacked
those sequences), while the other processes read it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    import distill.session
    import distill.teacher_cache
    from distill.cli import app

    separator = argv.index("--")
    options, run_args = argv[:separator], argv[separator + 1 :]
    probe = Path(options[0])
    miss_on = int(options[options.index("--miss-on-rank") + 1]) if "--miss-on-rank" in options else None
    record = {"teacher_forwards": 0, "generated": [], "rank": None}

    original_load = distill.session.load_model

    def load_model(spec, role, *args, **kwargs):
        model = original_load(spec, role, *args, **kwargs)
        if role == "teacher":
            first_layer = next(m for name, m in model.named_modules() if name.endswith("layers.0"))
            first_layer.register_forward_pre_hook(
                lambda *_: record.__setitem__("teacher_forwards", record["teacher_forwards"] + 1)
            )
        return model

    distill.session.load_model = load_model

    original_open = distill.session.open_session

    def open_session(*args, **kwargs):
        session = original_open(*args, **kwargs)
        record["teacher_forwards"] = 0  # the training's, not the set-up's checks of the heads
        rank = record["rank"] = session.accelerator.process_index
        generate = session.context.generate_student

        def generate_student(examples):
            out = generate(examples)
            record["generated"].extend(list(e.response_ids) for e in out)
            return out

        session.context = type(session.context)(generate_student, session.context.generate_teacher)
        if miss_on == rank:  # the cache lacks this process's sequences of step 1 (the policy samples once a step)
            sample, steps = session.policy.sample, {"n": 0}

            def counting_sample(*args, **kwargs):
                steps["n"] += 1
                return sample(*args, **kwargs)

            session.policy.sample = counting_sample
            targets = distill.teacher_cache.TeacherCache.targets

            def missing_in_step_1(self, *args, **kwargs):
                return None if steps["n"] == 1 else targets(self, *args, **kwargs)

            distill.teacher_cache.TeacherCache.targets = missing_in_step_1
        return session

    distill.session.open_session = open_session
    import distill.engine

    distill.engine.open_session = open_session
    try:
        app(run_args, standalone_mode=False)
    finally:
        probe.mkdir(parents=True, exist_ok=True)
        (probe / f"rank-{record['rank']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1:])
