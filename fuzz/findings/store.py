"""The crash store: one directory per unique divergence signature.

    crashes/<id>/case.json        the smallest case seen with this signature (replayable)
    crashes/<id>/divergence.json  era, kind, signature, first/last seen, count, the stop
    crashes/<id>/report.txt       side-by-side stops with disassembly

Workers of one campaign and campaigns on the same directory share it: the
first to create a signature's directory writes it, later hits only add to
its count (batched, under a lock).  Every file is written to a temporary
name and renamed, so a kill never leaves a half-written file.

A case is kept -- for a new signature, or replacing a larger one -- only if
a fresh check of it gives the signature again: a divergence that does not
reproduce is a bug in stepfuzz (state leaking from one execution into the
next), never a finding to report.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from stepfuzz.oracle.run import Result, check

from stepfuzz.fuzz.findings.report import result_table

FLUSH_EVERY_S = 10.0          # counts reach the disk at least this often ...
FLUSH_SHARE = 0.01            # ... unless writing them would take more than this share of the time


def now_iso(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, timezone.utc).isoformat(timespec="seconds")


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write then rename: a killed process leaves the old file or the new one,
    never half of one.  (No fsync: that guards against power loss, not kills,
    and costs milliseconds per file in the fuzzing loop.)"""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def crash_records(root: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(directory, divergence.json) of every finding under `root`, in name order."""
    for d in sorted(root.iterdir()) if root.is_dir() else ():
        info = read_json(d / "divergence.json") if d.is_dir() else None
        if info:
            yield d, info


@dataclass
class _Pending:
    count: int = 0
    last_seen: float = 0.0        # seconds since the epoch (formatted when flushed)
    best: Result | None = None


class UnstableDivergence(Exception):
    """A divergence the same case does not give when checked again."""

    def __init__(self, message: str, signature: str):
        super().__init__(message)
        self.key = signature          # one kept input per signature


class CrashStore:
    def __init__(self, root: Path, worker: str = "", started: float | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.worker = worker or f"pid{os.getpid()}"
        self.started = started if started is not None else time.time()
        self.seen: set[str] = set()
        self.pending: dict[str, _Pending] = {}
        self.last_flush = time.monotonic()
        self.flush_every = FLUSH_EVERY_S

    def record(self, r: Result, execs: int = 0) -> bool:
        """Keep a divergent result; True if its signature is new to the store.
        Raises UnstableDivergence (and keeps nothing) if a new signature does
        not reproduce."""
        d = r.divergence
        assert d is not None
        sid = d.sig_id
        if sid not in self.seen:
            created = self._create(r, execs)
            self.seen.add(sid)
            if created:
                return True           # counted as 1 on creation
        p = self.pending.setdefault(sid, _Pending())
        p.count += 1
        p.last_seen = time.time()
        if p.best is None or len(r.case.words) < len(p.best.case.words):
            p.best = r
        if time.monotonic() - self.last_flush > self.flush_every:
            self.flush()
        return False

    @staticmethod
    def _again(r: Result) -> Result:
        """The case of `r` checked again, whole (campaigns stop a model at its
        divergence; reports show all of it)."""
        return check(r.case, [r.era])[0]

    @staticmethod
    def _same(r: Result, again: Result) -> bool:
        return again.divergence is not None and again.divergence.signature == r.divergence.signature

    def _create(self, r: Result, execs: int) -> bool:
        """A directory for `r`; False if one exists.  Raises UnstableDivergence
        if its case does not give its divergence again."""
        path = self.root / r.divergence.sig_id
        if (path / "divergence.json").exists():
            return False               # another worker or an earlier campaign has it
        whole = self._again(r)
        if not self._same(r, whole):
            again = whole.divergence.signature if whole.divergence else "agrees"
            raise UnstableDivergence(f"{r.divergence.signature} did not reproduce on a second check ({again})",
                                     r.divergence.signature)
        d = whole.divergence
        try:
            path.mkdir()
        except FileExistsError:
            if (path / "divergence.json").exists():
                return False
        self._write_case(path, whole)
        info = {**d.to_json(), "era": r.era.id, "kernels": r.era.kernels,
                "first_seen": now_iso(), "last_seen": now_iso(), "count": 1,
                "case_insns": len(r.case.words),
                "first_found": {"worker": self.worker, "elapsed_s": round(time.time() - self.started, 3),
                                "execs": execs}}
        write_atomic(path / "divergence.json", json.dumps(info, indent=2) + "\n")
        return True

    def _write_case(self, path: Path, r: Result) -> None:
        """case.json and report.txt of `r`, a check with whole traces."""
        d = r.divergence
        case = r.case.with_words().to_json()
        case["name"] = d.title
        write_atomic(path / "case.json", json.dumps(case, indent=2) + "\n")
        # relative: the directory may be moved or merged into another
        replay = f"stepfuzz run case.json --era {r.era.id}   (in this directory)"
        write_atomic(path / "report.txt", f"{d.title}\nsignature: {d.signature}\nreplay: {replay}\n\n"
                     + result_table(r, "case.json") + "\n")

    def flush(self) -> None:
        """Counts, last sightings and smaller cases of known signatures to disk."""
        begun = self.last_flush = time.monotonic()
        for sid, p in list(self.pending.items()):
            path = self.root / sid
            if not path.is_dir():
                continue
            with open(path / ".lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                info = read_json(path / "divergence.json")
                if info is None:
                    continue
                info["count"] = info.get("count", 0) + p.count
                info["last_seen"] = max(info.get("last_seen", ""), now_iso(p.last_seen))
                smaller = p.best is not None and len(p.best.case.words) < info.get("case_insns", 1 << 30)
                whole = self._again(p.best) if smaller else None
                if whole is not None and self._same(p.best, whole):     # a case kept must give it again
                    self._write_case(path, whole)
                    info.update(whole.divergence.to_json())      # the stop as this case shows it
                    info["case_insns"] = len(whole.case.words)
                write_atomic(path / "divergence.json", json.dumps(info, indent=2) + "\n")
        self.pending.clear()
        # A campaign with hundreds of signatures spends a few hundred ms per
        # flush (a locked read and write of each): space flushes out so that
        # they stay a small share of its time.
        self.flush_every = max(FLUSH_EVERY_S, (time.monotonic() - begun) / FLUSH_SHARE)
