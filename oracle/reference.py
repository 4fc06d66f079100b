"""The reference: an ideal single-stepper, one stop after every completed instruction."""
from __future__ import annotations

from .guest import ExecLog
from .vocabulary import Outcome
from .trace import RefTrace


def reference(log: ExecLog) -> RefTrace:
    """Stops of the ideal stepper for the execution in `log`.

    Stop i is at the PC of instruction i+1; the run ends at the end of the
    code, at a run ending both sides share, or after max_steps instructions.
    """
    limit = log.case.max_steps
    # the bound wins over whatever comes after it, as in the models
    if log.n > limit or (log.n == limit and log.outcome != Outcome.END):
        return RefTrace(log.pcs[1:limit + 1], Outcome.MAX_STEPS)
    return RefTrace(log.pcs[1:], log.outcome, log.detail)
