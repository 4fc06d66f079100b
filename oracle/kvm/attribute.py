"""Which of an era's policy choices cause a divergence: a bisection over the
era table, run on the models, that needs no kernel build.

For a case that diverges on era E, a candidate fix is what one later
release changed (its Era.changes, the fields it set differently from the
release before it), applied to E; the case runs again on the changed era.
The smallest set of releases' fixes that removes the divergence (one, then
two, then three; the earliest in history first) says which commit(s) fixed
it.  Within those, the fields are then dropped one at a time while the
divergence stays removed: what is left are the policy points E gets wrong,
and the kernel functions behind them.  Only when no set of released fixes
removes it are the architecture's own choices (`arch`) tried, one field at
a time: what they find has no fixing commit, and neither has a divergence
nothing removes.  Both are new-bug candidates.  Nothing here looks at what
the case contains.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from ..case import Case
from ..compare import Divergence, compare
from ..guest import Emulation, ExecLog, execute
from ..reference import reference
from ..vocabulary import DivergenceKind
from .eras import ERAS, POLICY_POINTS, Era
from .vmm import model_trace

MAX_FIXES = 3                 # larger sets of releases' fixes are not searched
ARCH = "arch"


@dataclass(frozen=True)
class Fix:
    """What one later release (or, field by field, the architecture) would
    change in an era's policy."""
    era: str                                  # the release that made it ('arch': none did)
    fields: tuple[tuple[str, object], ...]    # policy field -> the value it sets
    commits: tuple[tuple[str, str], ...]      # policy field -> the commits that set it

    @property
    def released(self) -> bool:
        return ERAS[self.era].released


@dataclass(frozen=True)
class Attribution:
    era: str
    fixes: tuple[Fix, ...]                    # the smallest set that removes the divergence; () if none does
    points: tuple[tuple[str, object], ...]    # the fields of those fixes that matter, and their fixed values
    checks: int                               # model runs spent

    @property
    def explained(self) -> bool:
        """Some release changed what causes it (it has a fixing commit)."""
        return bool(self.fixes) and all(f.released for f in self.fixes)

    @property
    def fixed_by(self) -> list[str]:
        """The fixing commits of the policy points that matter, each once."""
        out: list[str] = []
        for fix in self.fixes:
            out += [c for c in _commits_of(fix, self.points) if c not in out]
        return out

    @property
    def mechanism(self) -> str:
        """What the signature keys on: the fix (release and commits), or the
        architecture's fields, or `unexplained`."""
        if self.explained:
            return "+".join(f"{release_of(f.era)}:{'+'.join(_commits_of(f, self.points))}" for f in self.fixes)
        if self.fixes:
            return "+".join(f"arch:{name}={value}" for name, value in self.points)
        return "unexplained"

    @property
    def functions(self) -> list[str]:
        return [POLICY_POINTS[name].function for name, _ in self.points]


def _commits_of(fix: Fix, points: tuple[tuple[str, object], ...]) -> list[str]:
    wanted = {name for name, _ in points}
    out: list[str] = []
    for name, commits in fix.commits:
        if name in wanted:
            out += [c for c in commits.split("+") if c not in out]
    return out


def later_eras(era: Era) -> list[Era]:
    """The released eras after `era` in the kernel's history, oldest first (an
    unmerged era is followed by what followed the release it was based on)."""
    base = era
    while not base.released and base.after is not None:
        base = ERAS[base.after]
    if not base.released:
        return []
    return sorted((e for e in ERAS.values() if e.released and e.since is not None
                   and (base.since is None or e.since > base.since)), key=lambda e: e.since)


def candidate_fixes(era: Era) -> list[Fix]:
    """Each later release's change, where it differs from `era`, in history's
    order; then the architecture's choices, one field each."""
    out = []
    for later in later_eras(era):
        fields = tuple((name, getattr(later, name)) for name, _ in later.changes
                       if getattr(later, name) != getattr(era, name))
        if fields:
            out.append(Fix(later.id, fields, tuple((n, c) for n, c in later.changes if n in dict(fields))))
    if era.id != ARCH:
        arch = ERAS[ARCH]
        for name in POLICY_POINTS:
            if getattr(arch, name) != getattr(era, name):
                out.append(Fix(ARCH, ((name, getattr(arch, name)),), ()))
    return out


def removes(d: Divergence, again: Divergence | None) -> bool:
    """The changed era no longer shows `d`: it agrees, first differs later, or
    its first difference is of another kind (an instruction no longer skipped
    may still share its window with another era's bug)."""
    return again is None or again.stop > d.stop or (again.stop == d.stop and again.kind != d.kind)


def attribute(case: Case, era: Era, d: Divergence | None = None, log: ExecLog | None = None) -> Attribution:
    """The smallest set of later fixes that removes `era`'s divergence on `case`
    (`log`: the case's execution, when the caller has it: every changed era
    runs over the same one, as every era does in a check)."""
    from ..run import has_smc, model_emulation, reference_emulation
    smc = has_smc(case)
    logs: dict[Emulation, ExecLog] = {}

    def log_of(e: Emulation) -> ExecLog:
        if e not in logs:
            logs[e] = execute(case, emulation=e)
        return logs[e]

    if log is not None:
        logs[log.emulation] = log      # (the caller's execution, often the reference's too)
    ref_log = log_of(reference_emulation(era, smc))
    emu = model_emulation(era, ref_log)
    ref = reference(ref_log)
    if d is None:
        d = compare(ref, model_trace(era, log_of(emu)), era.id, log_of(emu), ref_log)
        if d is None:
            raise ValueError(f"{case.source}: does not diverge on era {era.id}")
    checks = 0

    def removed(fields: dict[str, object]) -> bool:
        nonlocal checks
        checks += 1
        changed = replace(era, **fields)
        # (a fix of the kernel's emulation changes the execution; the
        # reference stays the era's)
        changed_log = log_of(model_emulation(changed, ref_log))
        return removes(d, compare(ref, model_trace(changed, changed_log), era.id, changed_log, ref_log))

    candidates = candidate_fixes(era)
    released = [f for f in candidates if f.released]
    arch = [f for f in candidates if not f.released]
    for pool, largest in ((released, MAX_FIXES), (arch, 2)):
        for size in range(1, largest + 1):
            for subset in itertools.combinations(pool, size):
                fields = dict(kv for f in subset for kv in f.fields)     # a later release's value wins
                if removed(fields):
                    return Attribution(era.id, subset, _points(fields, removed), checks)
    return Attribution(era.id, (), (), checks)


def _points(fields: dict[str, object], removed) -> tuple[tuple[str, object], ...]:
    """The fields of a fix that matter: each dropped in turn while the rest
    still remove the divergence."""
    kept = dict(fields)
    for name in list(fields):
        if len(kept) > 1:
            trial = {k: v for k, v in kept.items() if k != name}
            if removed(trial):
                kept = trial
    return tuple(kept.items())


def release_of(era_id: str) -> str:
    """The first upstream release an era stands for ('v5.11'); the era id
    for one that is none."""
    since = ERAS[era_id].since
    if since is None:
        return era_id if not ERAS[era_id].released else "v0"
    major, minor, patch = since
    return f"v{major}.{minor}" + (f".{patch}" if patch else "")


# What a VMM sees, for signatures: a missing stop at the end of a run is
# instructions run without their own stop, as a multi-step is.
SYMPTOM = {DivergenceKind.MISSING_STOP: DivergenceKind.MULTI_STEP}


@dataclass(frozen=True)
class RootCause:
    """A divergence named by its mechanism: what crash directories, the
    minimizer, merges and triage key on (`signature`), free of the era it was
    seen on and of incidental events."""
    signature: str
    kind: str                     # the symptom: the divergence kind, a missing stop counted as multi-step
    mechanism: str                # 'v5.11:cdb5e02ed133', 'arch:skip=el1-clear' or 'unexplained'
    fixed_by: tuple[str, ...]     # commits; () for a new-bug candidate
    fixed_in: str                 # the first release with the fix ('v5.11'), '' for none
    functions: tuple[str, ...]    # the kernel functions of the policy points involved
    points: tuple[str, ...]       # the policy points, as field=fixed value
    explanation: str              # for people

    @property
    def new_bug_candidate(self) -> bool:
        return not self.fixed_by

    def to_json(self) -> dict:
        return {"signature": self.signature, "kind": self.kind, "mechanism": self.mechanism,
                "fixed_by": list(self.fixed_by), "fixed_in": self.fixed_in, "functions": list(self.functions),
                "points": list(self.points), "new_bug_candidate": self.new_bug_candidate,
                "explanation": self.explanation}


def root_cause(a: Attribution, d: Divergence) -> RootCause:
    era = ERAS[a.era]
    kind = SYMPTOM.get(d.kind, d.kind)
    if a.explained:
        signature = f"{a.mechanism}/{kind}"
        fixed_in = release_of(max((ERAS[f.era] for f in a.fixes), key=lambda e: e.since).id)
    elif a.fixes:
        signature, fixed_in = f"candidate:{a.mechanism}/{kind}", ""
    else:             # nothing removes it: a gap in the era table, or an oracle bug on arch
        signature, fixed_in = f"unexplained:{a.era}/{kind}/{d.cause}", ""
    parts = []
    for name, value in a.points:
        point = POLICY_POINTS[name]
        fix = next(f for f in a.fixes if name in dict(f.fields))
        where = (f"{value} since {release_of(fix.era)} ({', '.join(_commits_of(fix, ((name, value),)))})"
                 if fix.released else f"{value} in the architecture's state machine only")
        parts.append(f"{point.function} decides {point.decides}: {name}={getattr(era, name)} on {a.era}, {where}")
    if not parts:
        parts.append(f"no later era's choice removes it on {a.era}")
    return RootCause(signature, kind, a.mechanism, tuple(a.fixed_by), fixed_in, tuple(a.functions),
                     tuple(f"{n}={v}" for n, v in a.points), "; ".join(parts))


def root_cause_of(r) -> RootCause:
    """The root cause of a divergent oracle Result (stepfuzz.oracle.run),
    attributed over the execution the result already has."""
    return root_cause(attribute(r.case, r.era, r.divergence, r.log), r.divergence)

