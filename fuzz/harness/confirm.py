"""The step between the oracle and the crash store: confirm, then keep.

Campaigns check with first_divergence_only (a model stops at its first
differing stop), so a result the harness sees is neither whole (a report
shows all of a trace) nor proven: a divergence that its case does not give
again is a bug in stepfuzz (state leaking from one execution into the
next), never a finding.  So a case is kept -- for a new signature, or in
place of a larger one -- only after a fresh, whole check of it gives the
signature again; the store receives that whole result and never runs the
oracle itself.  A new signature that does not reproduce raises
UnstableDivergence (the harness keeps its input as an oracle error); a
smaller case that does not is dropped and the kept one stays.
"""
from __future__ import annotations

import time

from stepfuzz.oracle.kvm.attribute import RootCause, root_cause_of
from stepfuzz.oracle.run import Result, check

from stepfuzz.fuzz.findings.crashdir import root_id
from stepfuzz.fuzz.findings.store import CrashStore


class UnstableDivergence(Exception):
    """A divergence the same case does not give when checked again."""

    def __init__(self, message: str, signature: str):
        super().__init__(message)
        self.key = signature          # one kept input per signature


def again(r: Result) -> Result:
    """The case of `r` checked again, whole."""
    return check(r.case, [r.era])[0]


def same(r: Result, again: Result) -> bool:
    """The same era divergence (its per-era signature: attribution, which
    names the root cause, is a function of the case and the era)."""
    return again.divergence is not None and again.divergence.signature == r.divergence.signature


def confirm(r: Result) -> Result:
    """The whole result of checking `r`'s case again; UnstableDivergence if
    it does not give `r`'s signature."""
    whole = again(r)
    if not same(r, whole):
        shown = whole.divergence.signature if whole.divergence else "agrees"
        raise UnstableDivergence(f"{r.divergence.signature} did not reproduce on a second check ({shown})",
                                 r.divergence.signature)
    return whole


class RootCauses:
    """Attribution of campaign results, once per per-era signature and
    process.  Attributing costs a few model runs, and a campaign sees the
    same few hundred signatures millions of times: a result is counted
    under the root cause its signature was first attributed to.  Whatever a
    directory keeps is attributed afresh from its own case (`of_case`)."""

    def __init__(self) -> None:
        self.known: dict[str, RootCause] = {}

    def of(self, r: Result) -> RootCause:
        d = r.divergence
        root = self.known.get(d.signature)
        if root is None:
            root = self.known[d.signature] = self.of_case(r)
        return root

    of_case = staticmethod(root_cause_of)


class Keeper:
    """A crash store fed by a campaign: every divergent result of a check
    goes to `record`, which names its root cause; what the store keeps is
    confirmed (and attributed from its own case) first.  Between flushes it
    remembers the smallest case of each known root cause, and confirms it
    when the store's counts are flushed (the flush's time, and so the
    spacing of flushes, includes those checks)."""

    def __init__(self, store: CrashStore):
        self.store = store
        self.roots = RootCauses()
        self.best: dict[str, Result] = {}       # root id -> smallest case since the last flush

    def record(self, r: Result, execs: int = 0) -> str | None:
        """The root cause signature of `r` if it is new to the store (it now
        has a directory), else None.  Raises UnstableDivergence, keeping
        nothing, if a new root cause does not reproduce."""
        store = self.store
        root = self.roots.of(r)
        rid = root_id(root.signature)
        if not store.knows(rid):
            whole = confirm(r)
            own = self.roots.of_case(whole)
            if store.create(whole, own, execs):
                if own.signature == root.signature:
                    return own.signature
                root, rid = own, root_id(own.signature)     # filed where its own case belongs
        store.hit(rid, r)
        best = self.best.get(rid)
        if best is None or r.case.keep_key() < best.case.keep_key():
            self.best[rid] = r
        if store.flush_due():
            self.flush()
        return None

    def flush(self) -> None:
        """Confirm the smaller cases, then flush the store."""
        begun = time.monotonic()
        for rid, r in self.best.items():
            kept = self.store.kept_key(rid)
            if kept is not None and r.case.keep_key() < kept:
                whole = again(r)
                if same(r, whole):              # a case kept must give it again ...
                    own = self.roots.of_case(whole)
                    if root_id(own.signature) == rid:   # ... and be filed there on its own merits
                        self.store.offer(whole, own)
        self.best.clear()
        self.store.flush(begun)
