"""Run a case through the reference and the era models: the oracle's front door."""
from __future__ import annotations

from dataclasses import dataclass

from .case import Case
from .compare import Divergence, compare
from .guest import ExecLog, execute
from .isa import InsnClass, decode
from .kvm.eras import Era
from .kvm.vmm import model_trace
from .reference import reference
from .trace import RefTrace, Trace
from .vocabulary import Outcome, SmcAbi


@dataclass
class Result:
    case: Case
    era: Era
    log: ExecLog
    reference: RefTrace
    model: Trace                  # outcome NOT_REPRODUCIBLE (detail: why) if the era cannot run it
    divergence: Divergence | None


def has_smc(case: Case) -> bool:
    """Does the case's code hold an SMC (whose effect depends on the era's SmcAbi)?"""
    return any(decode(w).kind == InsnClass.SMC for w in case.words)


def not_reproducible(case: Case, era: Era) -> str:
    """Why `era` cannot run `case` (a KVM feature its kernels lack), or ""."""
    for feature in case.needs():
        why = era.lacks(feature)
        if why:
            return why
    return ""


def check(case: Case, eras: list[Era], first_divergence_only: bool = False) -> list[Result]:
    """One execution of the guest (per SMC ABI, if the case has an SMC), then
    every era's model over it.  With first_divergence_only a model stops at
    its first differing stop: the divergence (and its signature) is the same,
    the rest of its trace is not computed (campaigns; `stepfuzz run` shows
    whole traces)."""
    runs: dict[SmcAbi, tuple[ExecLog, RefTrace]] = {}
    results = []
    smc = has_smc(case)        # (one log serves every era when there is none)
    for era in eras:
        abi = era.smc_abi if smc else SmcAbi.SMCCC
        if abi not in runs:
            log = execute(case, smc_abi=abi)
            runs[abi] = (log, reference(log))
        log, ref = runs[abi]
        why = not_reproducible(case, era)
        if why:
            results.append(Result(case, era, log, ref, Trace([], Outcome.NOT_REPRODUCIBLE, why), None))
            continue
        model = model_trace(era, log, ref if first_divergence_only else None)
        results.append(Result(case, era, log, ref, model, compare(ref, model, era.id, log)))
    return results
