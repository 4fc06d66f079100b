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
