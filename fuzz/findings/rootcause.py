"""The root cause of a finding: what its record says, or -- for a crash
directory written before root causes, one per-era signature -- what
attributing its case on its era says now.  Triage and merges both use it,
so old directories fall into the same root causes as new ones."""
from __future__ import annotations

from typing import Any

from stepfuzz.oracle.case import CaseError, load_case
from stepfuzz.oracle.kvm.attribute import root_cause_of
from stepfuzz.oracle.kvm.eras import ERAS
from stepfuzz.oracle.run import check

from stepfuzz.fuzz.findings.crashdir import CrashDir, DivergenceRecord, UnreadableRecord


def root_of(cd: CrashDir, record: DivergenceRecord) -> dict[str, Any]:
    """The finding's RootCause as JSON; UnreadableRecord if it has none and
    its case cannot give one (unreadable, of an unknown era, no longer
    diverging)."""
    if record.root_cause:
        return dict(record.root_cause)
    try:
        case = load_case(cd.case)
    except CaseError as e:
        raise UnreadableRecord(cd.case, e.problem) from None
    if record.era not in ERAS:
        raise UnreadableRecord(cd.record_path, f"era {record.era!r} is not one this stepfuzz knows")
    (r,) = check(case, [ERAS[record.era]])
    if r.divergence is None:
        raise UnreadableRecord(cd.case, f"does not diverge on era {record.era} any more (a finding of another version)")
    return root_cause_of(r).to_json()


# Root causes of what a real kernel showed (stepfuzz.oracle.realkvm.check.judge):
# a confirmed divergence has its model's; the other two are named here.
MODEL_GAP_PREFIX, REAL_PREFIX = "model-gap:", "real:"


def root_of_verdict(v, kernel: str, attribute=root_cause_of):
    """The RootCause a campaign on real kernel `kernel` (its version) files
    a Verdict under: a confirmed one is the model's divergence, attributed
    (by `attribute`: a campaign passes its cache); a model gap and a new-bug
    candidate are named by the era and by the kinds of divergence the model
    and the kernel show ('none' for no divergence)."""
    from stepfuzz.oracle.kvm.attribute import RootCause
    from stepfuzz.oracle.realkvm.check import CONFIRMED, NEW_BUG
    if v.verdict == CONFIRMED:
        return attribute(v.model)
    era = v.model.era.id
    model_kind = v.model.divergence.kind if v.model.divergence else "none"
    real = v.kernel.divergence
    real_kind = real.kind if real else "none"
    if v.verdict == NEW_BUG:
        return RootCause(f"{REAL_PREFIX}{era}/{real_kind}", real_kind, "real-kernel", (), "", (), (),
                         f"Linux {kernel} diverges from the architecture ({real_kind}) where era {era}'s model "
                         "predicts no divergence: a KVM behaviour no model explains")
    return RootCause(f"{MODEL_GAP_PREFIX}{era}/{model_kind}-vs-{real_kind}", real_kind if real else model_kind,
                     "model-gap", (), "", (), (),
                     f"era {era}'s model shows {model_kind if model_kind != 'none' else 'the reference stops'}, "
                     f"Linux {kernel} shows {real_kind if real else 'the reference stops'}: the model does not "
                     "stand for this kernel (a bug in stepfuzz)")


def root_of_vm_death(r, kernel: str):
    """The RootCause of a case that killed the VM on real kernel `kernel`
    every time it ran (its Result's divergence names how it died)."""
    from stepfuzz.oracle.kvm.attribute import RootCause
    from stepfuzz.oracle.vocabulary import DivergenceKind
    cause = r.divergence.cause
    return RootCause(f"{REAL_PREFIX}{r.era.id}/{cause}", DivergenceKind.OUTCOME, "real-kernel", (), "", (), (),
                     f"this case killed the VM on Linux {kernel} every time it ran ({cause}): a kernel crash "
                     "or hang no model explains")
