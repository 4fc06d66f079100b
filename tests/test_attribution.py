"""Attribution: a divergence's root cause derived from the era table."""
import json

import pytest

from conftest import CORPUS
from stepfuzz.oracle.case import load_case
from stepfuzz.oracle.kvm.attribute import attribute, candidate_fixes, later_eras, root_cause
from stepfuzz.oracle.kvm.eras import ERAS, POLICY_POINTS
from stepfuzz.oracle.run import check

# corpus/known/<file>: the commit docs/eras.md names as the fix of what its era shows
DOCUMENTED_FIX = {
    "4.14-emulated-sysreg-multi-step.json": "kvm_arm_handle_step_debug",
    "4.14-userspace-mmio-multi-step.json": "kvm_arm_handle_step_debug",
    "4.15-stage2-fault-zero-step.json": "bd7d95cafb49",
    "5.0-immediate-exit-skips-insn.json": "2113c5f62b74",
    "5.11-irq-after-retire-multi-step.json": "34fbdee086cf",
    "5.13-signal-after-sysreg-trap.json": "2ca3f03bf524",
    "6.1-immediate-exit-after-mmio.json": "2ca3f03bf524",
}


def test_every_era_names_the_commits_of_exactly_the_fields_it_changed():
    for era in ERAS.values():
        if era.after is None:
            continue
        before = ERAS[era.after]
        differ = {f for f in POLICY_POINTS if getattr(era, f) != getattr(before, f)}
        assert {f for f, _ in era.changes} == differ, era.id


def test_history_runs_forward():
    assert [e.id for e in later_eras(ERAS["5.10"])] == ["5.11", "5.13", "6.1", "6.4", "6.14", "7.2"]
    assert later_eras(ERAS["rfc-2018"]) == later_eras(ERAS["4.15"])
    assert later_eras(ERAS["arch"]) == [] and candidate_fixes(ERAS["arch"]) == []
    assert all(f.era == "arch" for f in candidate_fixes(ERAS["7.2"]))


@pytest.mark.parametrize("name", sorted(DOCUMENTED_FIX))
def test_known_cases_attribute_to_the_documented_fix(name):
    path = CORPUS / "known" / name
    era = ERAS[name.split("-")[0]]
    case = load_case(path)
    (r,) = check(case, [era])
    assert r.divergence is not None
    a = attribute(case, era, r.divergence)
    assert a.explained, (name, a.mechanism)
    assert any(DOCUMENTED_FIX[name] in c for c in a.fixed_by), (name, a.mechanism, a.fixed_by)
    assert len(a.fixes) == 1                # one release fixed each


def test_the_same_bug_on_several_eras_is_one_mechanism():
    case = load_case(CORPUS / "known" / "5.11-irq-after-retire-multi-step.json")
    mechanisms = {r.era.id: root_cause(attribute(case, r.era, r.divergence), r.divergence).signature
                  for r in check(case, list(ERAS.values())) if r.divergence}
    assert {"5.0", "5.10", "5.11", "5.13"} <= set(mechanisms)
    assert len(set(mechanisms.values())) == 1, mechanisms


def test_incidental_events_do_not_change_the_mechanism(write_case):
    """A preempt and a signal added beside an MMIO exit leave its root cause alone."""
    data = json.loads((CORPUS / "exits" / "mmio-read.json").read_text())
    plain = load_case(write_case(data, "plain.json"))
    data["events"] = [{"when": "mmio-exit", "n": 1, "what": "preempt"}, {"when": "stop", "n": 1, "what": "preempt"}]
    noisy = load_case(write_case(data, "noisy.json"))
    for era in ("5.0", "5.10"):
        (a,) = check(plain, [ERAS[era]])
        (b,) = check(noisy, [ERAS[era]])
        assert a.divergence.signature != b.divergence.signature        # the old signature split them
        assert root_cause(attribute(plain, ERAS[era]), a.divergence).signature == \
            root_cause(attribute(noisy, ERAS[era]), b.divergence).signature


def test_current_era_divergences_are_new_bug_candidates():
    """What no release changed has no fixing commit."""
    case = load_case(CORPUS / "known" / "6.1-immediate-exit-after-mmio.json")
    (r,) = check(case, [ERAS["6.14"]])
    assert r.divergence is None      # fixed there: nothing to attribute
    with pytest.raises(ValueError):
        attribute(case, ERAS["6.14"])


def test_rediscovery_classes_are_root_causes_of_the_seed_corpus():
    from stepfuzz.fuzz.campaign.rediscover import CLASSES
    derived = set()
    for path in CORPUS.rglob("*.json"):
        case = load_case(path)
        for r in check(case, [ERAS[e] for e, want in case.expect if want not in ("agree", "not-reproducible")]):
            derived.add(root_cause(attribute(case, r.era, r.divergence), r.divergence).signature)
    assert {s for s in CLASSES.values() if s != "arch"} <= derived

