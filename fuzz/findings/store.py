"""The crash store: one directory per unique divergence signature.

    crashes/<id>/case.json        the smallest case seen with this signature (replayable)
    crashes/<id>/divergence.json  era, kind, signature, first/last seen, count, the stop
    crashes/<id>/report.txt       side-by-side stops with disassembly

(crashdir.py owns that layout and the record's format.)  Workers of one
campaign and campaigns on the same directory share it: the first to create a
signature's directory writes it, later hits only add to its count (batched,
under a lock).  Every file is written to a temporary name and renamed, so a
kill never leaves a half-written file.

The store only stores.  What it is given to keep -- the result for a new
signature, a smaller case for a known one -- is a whole result already
confirmed (its case checked again and giving the signature again: see
stepfuzz.fuzz.harness.confirm); the store never runs the oracle.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stepfuzz.fuzz.findings.crashdir import (CrashDir, DivergenceRecord, UnreadableRecord, now_iso,
                                             root_id, write_atomic)
from stepfuzz.fuzz.findings.report import result_table

if TYPE_CHECKING:
    from stepfuzz.oracle.kvm.attribute import RootCause
    from stepfuzz.oracle.run import Result

__all__ = ["CrashStore", "FLUSH_EVERY_S", "FLUSH_SHARE", "now_iso", "read_json", "write_atomic"]

FLUSH_EVERY_S = 10.0          # counts reach the disk at least this often ...
FLUSH_SHARE = 0.01            # ... unless writing them would take more than this share of the time


def read_json(path: Path) -> dict[str, Any] | None:
    """A small JSON file of a campaign (campaign.json, a worker's progress);
    None if it is missing or unreadable.  Not for divergence records: those
    are read with crashdir, which says what is wrong with one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


@dataclass
class _Pending:
    count: int = 0
    last_seen: float = 0.0        # seconds since the epoch (formatted when flushed)
    best: Result | None = None    # the smallest confirmed case offered since the last flush
    best_root: RootCause | None = None
    best_extra: str = ""          # what the report adds to the best case's (a real kernel's trace)
    eras: Counter = field(default_factory=Counter)          # hits per era
    signatures: Counter = field(default_factory=Counter)    # hits per per-era signature


class CrashStore:
    """Keeps confirmed, whole results (a check without first_divergence_only,
    its case known to give its divergence again), one directory per root
    cause: `root` is what attribution (stepfuzz.oracle.kvm.attribute) made
    of each, and the directory is named after its signature."""

    def __init__(self, root: Path, worker: str = "", started: float | None = None,
                 target: dict[str, str] | None = None):
        self.root = Path(root)
        # the real kernel the results come from (Kernel.mark()), None for the
        # models: a kernel's findings get directories of their own, marked with it
        self.target = target
        self.root.mkdir(parents=True, exist_ok=True)
        self.worker = worker or f"pid{os.getpid()}"
        self.started = started if started is not None else time.time()
        self.seen: set[str] = set()
        self.pending: dict[str, _Pending] = {}
        self.kept: dict[str, tuple[bool, int]] = {}   # root id -> keep_key of its kept case, as last written or read
        self.last_flush = time.monotonic()
        self.flush_every = FLUSH_EVERY_S

    def id_of(self, signature: str) -> str:
        """The directory name of a root cause (per kernel image, for a real kernel's)."""
        return root_id(signature if self.target is None else f"{signature}@{self.target['sha256']}")

    def dir(self, root_id: str) -> CrashDir:
        return CrashDir.at(self.root, root_id)

    def knows(self, root_id: str) -> bool:
        """True if the root cause has a directory (this store's or anyone's):
        a hit of it only counts; otherwise the store wants a confirmed result
        to create one (`create`)."""
        return root_id in self.seen or self.dir(root_id).is_finding()

    def record(self, r: Result, root: RootCause, execs: int = 0, extra: str = "") -> bool:
        """Keep a confirmed whole divergent result of root cause `root`; True
        if the root cause is new to the store (then it gets a directory,
        counted as 1), else it is counted and offered as a smaller case.
        `extra`: text the report adds (what a real kernel showed)."""
        rid = self.id_of(root.signature)
        if not self.knows(rid) and self.create(r, root, execs, extra):
            return True
        self.hit(rid, r)
        self.offer(r, root, extra)
        if self.flush_due():
            self.flush()
        return False

    def create(self, r: Result, root: RootCause, execs: int = 0, extra: str = "") -> bool:
        """A directory for the confirmed whole result `r`; False (and nothing
        written) if one exists.  Counts as its first hit."""
        d = r.divergence
        assert d is not None
        rid = self.id_of(root.signature)
        cd = self.dir(rid)
        if cd.is_finding() or not cd.claim():
            return False               # another worker or an earlier campaign has it
        self._write_case(cd, r, root, extra)
        info = {**d.to_json(), "id": rid, "era": r.era.id, "kernels": r.era.kernels,
                "first_seen": now_iso(), "last_seen": now_iso(), "count": 1,
                "case_insns": len(r.case.words), "case_timed": r.case.insn_timed,
                "first_found": {"worker": self.worker, "elapsed_s": round(time.time() - self.started, 3),
                                "execs": execs},
                "root_cause": root.to_json(), "eras": {r.era.id: 1}, "signatures": {d.signature: 1},
                **({"kernel": self.target} if self.target is not None else {})}
        cd.write_record(DivergenceRecord.from_json(info, cd.record_path))
        self.seen.add(rid)
        self.kept[rid] = r.case.keep_key()
        return True

    def hit(self, root_id: str, r: Result) -> None:
        """One more sighting of a known root cause, in `r` (its era and its
        per-era signature are counted too); written at the next flush."""
        self.seen.add(root_id)
        p = self.pending.setdefault(root_id, _Pending())
        p.count += 1
        p.last_seen = time.time()
        p.eras[r.era.id] += 1
        p.signatures[r.divergence.signature] += 1

    def offer(self, r: Result, root: RootCause, extra: str = "") -> None:
        """A confirmed whole result of a known root cause: its case replaces
        the kept one at the next flush if it is the smallest offered and smaller."""
        p = self.pending.setdefault(self.id_of(root.signature), _Pending())
        if p.best is None or r.case.keep_key() < p.best.case.keep_key():
            p.best, p.best_root, p.best_extra = r, root, extra

    def kept_key(self, sig_id: str) -> tuple[bool, int] | None:
        """The size of the case kept for a signature, as this store last wrote
        or read it (another worker may have kept a smaller one since: a flush
        checks again, under the lock); None if there is no readable record (a
        flush skips those)."""
        if sig_id not in self.kept:
            try:
                self.kept[sig_id] = self.dir(sig_id).read_record().kept_key()
            except UnreadableRecord:
                return None
        return self.kept[sig_id]

    def flush_due(self) -> bool:
        return time.monotonic() - self.last_flush > self.flush_every

    def _write_case(self, cd: CrashDir, r: Result, root: RootCause, extra: str = "") -> None:
        """case.json and report.txt of `r`, a check with whole traces."""
        d = r.divergence
        case = r.case.with_words().to_json()
        case["name"] = d.title
        # relative: the directory may be moved or merged into another
        replay = f"stepfuzz run {CrashDir.CASE} --era {r.era.id}   (in this directory)"
        if self.target is not None:
            replay += (f"\n        stepfuzz kvm check {CrashDir.CASE} --kernel {self.target['name']}   "
                       f"(kernel {self.target['version']}, image sha256 {self.target['sha256'][:16]}...)")
        cd.write_case(case, f"{d.title}\nroot cause: {root.signature}\n  {root.explanation}\n"
                      f"signature on era {r.era.id}: {d.signature}\nreplay: {replay}\n\n"
                      + (extra + "\n\n" if extra else "") + result_table(r, CrashDir.CASE) + "\n")

    def flush(self, begun: float | None = None) -> None:
        """Counts, last sightings and smaller cases of known signatures to disk.
        `begun`: when (time.monotonic()) the flush began, if the caller did
        work for it first (confirming the smaller cases it offers)."""
        begun = self.last_flush = time.monotonic() if begun is None else begun
        for sid, p in list(self.pending.items()):
            cd = self.dir(sid)
            if not cd.path.is_dir():
                continue
            with cd.locked():
                try:
                    rec = cd.read_record()
                except UnreadableRecord:
                    continue
                rec = replace(rec, count=rec.count + p.count, last_seen=max(rec.last_seen, now_iso(p.last_seen)),
                              eras=_added(rec.eras, p.eras), signatures=_added(rec.signatures, p.signatures))
                if p.best is not None and p.best.case.keep_key() < rec.kept_key():
                    best = p.best
                    self._write_case(cd, best, p.best_root, p.best_extra)
                    # the stop, era and signature as this case shows them
                    rec = replace(rec.updated({**best.divergence.to_json(), "id": rec.id, "era": best.era.id,
                                               "kernels": best.era.kernels,
                                               "root_cause": p.best_root.to_json()}),
                                  case_insns=len(best.case.words), case_timed=best.case.insn_timed)
                cd.write_record(rec)
                self.kept[sid] = rec.kept_key()
        self.pending.clear()
        # A campaign with hundreds of signatures spends a few hundred ms per
        # flush (a locked read and write of each): space flushes out so that
        # they stay a small share of its time.
        self.flush_every = max(FLUSH_EVERY_S, (time.monotonic() - begun) / FLUSH_SHARE)


def _added(counts: Any, more: Counter) -> dict[str, int] | None:
    """Hit counts with `more` added (None stays None for a record of the
    version before root causes when nothing is added)."""
    if counts is None and not more:
        return None
    out = dict(counts or {})
    for k, n in more.items():
        out[k] = out.get(k, 0) + n
    return out
