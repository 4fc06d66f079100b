"""Run a case through the reference and the era models: the oracle's front door."""
from __future__ import annotations

from dataclasses import dataclass

from .case import Case
from .compare import Divergence, compare
from .guest import ExecLog, execute
from .kvm.eras import Era
from .kvm.vmm import model_trace
from .reference import reference
from .trace import RefTrace, Trace


@dataclass
class Result:
    case: Case
    era: Era
    log: ExecLog
    reference: RefTrace
    model: Trace
    divergence: Divergence | None


def check(case: Case, eras: list[Era], first_divergence_only: bool = False) -> list[Result]:
    """One execution of the guest, then every era's model over it.  With
    first_divergence_only a model stops at its first differing stop: the
    divergence (and its signature) is the same, the rest of its trace is not
    computed (campaigns; `stepfuzz run` shows whole traces)."""
    log = execute(case)
    ref = reference(log)
    results = []
    for era in eras:
        model = model_trace(era, log, ref.pcs if first_divergence_only else None)
        results.append(Result(case, era, log, ref, model, compare(ref, model, era.id, log)))
    return results
