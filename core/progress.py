"""Progress of long passes (validation, generation) as a plain callable, so that the core reports
progress without knowing how it is shown: the command line draws a rich bar on a terminal and prints
plain lines elsewhere (``distill.cli.run_cmd``)."""

from __future__ import annotations

from typing import Callable

Progress = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: ``done`` of the ``total`` items of ``phase`` are finished
(``"validation examples"``, ``"ROUGE-L answers"``); called with 0 when the pass begins, then
after each batch."""
