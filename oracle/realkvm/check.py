"""A real kernel against the era model that stands for it, case by case:
the library behind `stepfuzz kvm check`, triage's real-kernel column and
campaigns on real kernels.

A real trace is judged twice (`judge`): against the era model (does the
model stand for this kernel?) and against the reference (does the kernel
step as the architecture does?).  The four answers are the verdicts a
campaign keeps:

    model  reference
    same   same       agrees: nothing to keep
    same   differs    confirmed: a KVM divergence the era model explains
    differs same      model gap: the model predicts what the kernel does not do
    differs differs   new-bug candidate when the model predicted no divergence
                      (a KVM divergence no model explains), else a model gap
A difference from the model where QEMU's TCG cannot show what hardware does
is model-only, and no verdict.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..case import Case
from ..compare import Divergence, compare
from ..guest import ExecLog
from ..kvm.eras import Era
from ..run import Result, check
from ..trace import RefTrace, Trace
from ..vocabulary import DivergenceKind, Outcome
from .batch import MODEL_END_AS_REAL, NOT_COMPARABLE, Difference, RealTrace, difference, exits_differ
from .kernels import Kernel
from .vm import BOOT_TIMEOUT, RunStats, run_cases


@dataclass(frozen=True)
class Comparison:
    """One case on a real kernel.  `status` is identical, differs, model-only
    (it differs where QEMU's TCG cannot show what hardware does: the
    difference says why), error (the run produced no kernel result) or
    not-compared (the case cannot be reproduced there; `real.detail` says why)."""
    source: str
    case: Case
    real: RealTrace
    result: Result | None = None          # the era model's run of the case (when compared)
    difference: Difference | None = None

    @property
    def model(self) -> Trace | None:
        return self.result.model if self.result else None

    @property
    def status(self) -> str:
        if not self.real.compared:
            return "not-compared"
        if self.real.failed:
            return "error"
        if self.difference is None:
            return "identical"
        return "model-only" if self.difference.tcg_limit else "differs"


def compare_on_kernel(cases: list[tuple[str, Case]], kernel: Kernel | None, era: Era,
                      root: Path | None = None, boot_timeout: float = BOOT_TIMEOUT
                      ) -> tuple[list[Comparison], RunStats]:
    """Run `cases` on `kernel` (one boot) and compare each real trace with `era`'s model."""
    traces, stats = run_cases(cases, kernel, root, boot_timeout, era=era)
    return [compare_one(source, case, real, era) for (source, case), real in zip(cases, traces)], stats


# ---------------------------------------------------------------- verdicts

AGREES, CONFIRMED, MODEL_GAP, NEW_BUG = "agrees", "confirmed", "model-gap", "new-bug-candidate"
REAL_END_AS_MODEL = {real: model for model, real in MODEL_END_AS_REAL.items()}


def as_trace(real: RealTrace) -> Trace:
    """A real trace in the models' terms (its steps inferred), so that the
    comparator can name what the kernel did wrong."""
    return Trace(list(real.stops), REAL_END_AS_MODEL.get(real.end, real.end), real.detail, tail=real.tail)


def kvm_divergence(ref: RefTrace, era: str, real: RealTrace) -> Divergence | None:
    """How the kernel differs from the reference (None: it steps as the
    architecture does), in the comparator's terms -- steps, PC, kind of
    stop, ending -- and, where those agree, the exits (the guest's state,
    as the MMIO values it writes show it).  ISV is not part of it: the
    architecture leaves it to the implementation after an emulated access."""
    d = compare(ref, as_trace(real), era)
    if d is None:
        stops = ref.stops
        why = next((f"stop {i + 1}: {w}" for i, (m, r) in enumerate(zip(stops, real.stops))
                    if (w := exits_differ(m.exits, r.exits))), "") or exits_differ(ref.tail, real.tail)
        if not why:
            return None
        d = Divergence(era, DivergenceKind.STATE, len(real.stops), "", None, None,
                       detail=why.replace("(model)", "(reference)"))
    return Divergence(d.era, d.kind, d.stop, "real", d.expected, d.got, d.detail)


@dataclass(frozen=True)
class Verdict:
    """One compared case: the model's result, the kernel's (as a Result whose
    trace is the real one), and what the two say together."""
    comparison: Comparison
    kernel: Result            # the real trace against the reference
    verdict: str              # AGREES, CONFIRMED, MODEL_GAP, NEW_BUG, or "model-only"

    @property
    def model(self) -> Result:
        assert self.comparison.result is not None
        return self.comparison.result


def judge(c: Comparison) -> Verdict | None:
    """The verdict on a compared case (None if it was not compared or failed)."""
    if c.status in ("not-compared", "error"):
        return None
    model = c.result
    assert model is not None
    kernel = Result(c.case, model.era, model.log, model.reference, as_trace(c.real),
                    kvm_divergence(model.reference, model.era.id, c.real))
    if c.status == "model-only":
        verdict = "model-only"
    elif c.status == "identical":
        verdict = CONFIRMED if model.divergence is not None else AGREES
    elif kernel.divergence is not None and model.divergence is None:
        verdict = NEW_BUG
    else:
        verdict = MODEL_GAP
    return Verdict(c, kernel, verdict)


def compare_one(source: str, case: Case, real: RealTrace, era: Era, log: ExecLog | None = None) -> Comparison:
    """A real trace of `case` (steps inferred) against `era`'s model (`log`:
    the guest's execution, if the caller has it)."""
    if not real.compared or (real.failed and real.end != "timeout"):
        return Comparison(source, case, real)
    (result,) = check(case, [era], known=log)
    if result.model.outcome == Outcome.MAX_STEPS and not result.model.stepping_at_end:
        # the era's kernel lets the guest run free: a real one runs until a wall clock stops it
        real.end, real.detail = (f"{NOT_COMPARABLE}:runs-free", f"era {era.id}'s model runs past max_steps with "
                                 "nothing stepping: on a real kernel only a wall clock would stop it")
        return Comparison(source, case, real)
    if real.failed:
        return Comparison(source, case, real)
    return Comparison(source, case, real, result, difference(result.model, real))
