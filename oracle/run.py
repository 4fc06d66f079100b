"""Run a case through the reference and the era models: the oracle's front door."""
from __future__ import annotations

from dataclasses import dataclass

from .case import Case
from .compare import Divergence, compare
from .guest import Emulation, ExecLog, execute
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


def _words(case: Case):
    yield from case.words
    yield from case.handler_words.values()


def has_smc(case: Case) -> bool:
    """Does the case's code hold an SMC (whose effect depends on the era's SmcAbi)?"""
    return any(decode(w).kind == InsnClass.SMC for w in _words(case))


def reference_emulation(era: Era, smc: bool) -> Emulation:
    """The era's SMC ABI (either is correct) when the case has an SMC
    (`smc`: has_smc), and the architecture's MMIO loads."""
    return Emulation(smc_abi=era.smc_abi if smc else SmcAbi.SMCCC)


def has_signed_load(case: Case) -> bool:
    """Does the case's code hold a sign-extending load (whose MMIO value
    depends on the era)?"""
    return any((i := decode(w)).kind == InsnClass.MEM and i.signed for w in _words(case))


def model_emulation(era: Era, ref_log: ExecLog) -> Emulation:
    """The era's own: its MMIO loads too, where the code has a signed load
    (elsewhere the two executions are the same one).  Decided from the code,
    not from the reference's execution: a VMM's register write or a model's
    skip runs the guest again, down a path the reference never took."""
    return Emulation(ref_log.emulation.smc_abi, era.mmio_sign_extend or not has_signed_load(ref_log.case))


def not_reproducible(case: Case, era: Era) -> str:
    """Why `era` cannot run `case` (a KVM feature its kernels lack), or ""."""
    for feature in case.needs():
        why = era.lacks(feature)
        if why:
            return why
    return ""


def check(case: Case, eras: list[Era], first_divergence_only: bool = False,
          known: ExecLog | None = None) -> list[Result]:
    """One execution of the guest (per SMC ABI, if the case has an SMC), then
    every era's model over it.  With first_divergence_only a model stops at
    its first differing stop: the divergence (and its signature) is the same,
    the rest of its trace is not computed (campaigns; `stepfuzz run` shows
    whole traces).  `known`: an execution of `case` the caller already has
    (an execution is a function of the case and its emulation)."""
    logs: dict[Emulation, ExecLog] = {}
    if known is not None and not known.writes and (known.case is case or known.case == case):
        logs[known.emulation] = known
    refs: dict[Emulation, RefTrace] = {}
    results = []
    smc = has_smc(case)        # (one log serves every era when the emulations cannot differ)
    for era in eras:
        ref_emu = reference_emulation(era, smc)
        if ref_emu not in logs:
            logs[ref_emu] = execute(case, emulation=ref_emu)
        emu = model_emulation(era, logs[ref_emu])
        if emu not in logs:
            logs[emu] = execute(case, emulation=emu)
        if ref_emu not in refs:
            refs[ref_emu] = reference(logs[ref_emu])
        log, ref = logs[emu], refs[ref_emu]
        why = not_reproducible(case, era)
        if why:
            results.append(Result(case, era, log, ref, Trace([], Outcome.NOT_REPRODUCIBLE, why), None))
            continue
        model = model_trace(era, log, ref if first_divergence_only else None)
        results.append(Result(case, era, log, ref, model, compare(ref, model, era.id, log, logs[ref_emu])))
    return results
