"""Per-worker progress files, read by `stepfuzz fuzz` and `stepfuzz status`.

Each worker process rewrites <crashes>/.workers/<pid>.json every few
seconds: executions so far, RSS, unique divergences it knows of.  Oracle
errors (bugs in stepfuzz itself) are kept under <crashes>/.oracle-errors/.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import traceback
from pathlib import Path

from stepfuzz.fuzz.findings.store import write_atomic

WRITE_EVERY_S = 2.0


def rss_kb(pid: int | str = "self") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class WorkerStats:
    def __init__(self, crashes: Path, started: float):
        self.dir = Path(crashes) / ".workers"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"{os.getpid()}.json"
        self.started, self.begun = started, time.time()
        self.execs = 0
        self.next_write = time.monotonic() + WRITE_EVERY_S
        self.errors = Path(crashes) / ".oracle-errors"

    def tick(self, unique: int) -> None:
        self.execs += 1
        if time.monotonic() >= self.next_write:
            self.write(unique)

    def write(self, unique: int, final: bool = False) -> None:
        self.next_write = time.monotonic() + WRITE_EVERY_S
        write_atomic(self.path, json.dumps({
            "pid": os.getpid(), "execs": self.execs, "begun": self.begun, "updated": time.time(),
            "rss_kb": rss_kb(), "unique": unique, "final": final}))

    def oracle_error(self, data: bytes, err: Exception) -> None:
        """An execution that ended in an oracle bug."""
        self.execs += 1
        self.keep_error(data, err)

    def keep_error(self, data: bytes, err: Exception) -> None:
        """Keep the input and the error, once per place in the code that raised
        it (and per `key` the error may carry)."""
        self.errors.mkdir(parents=True, exist_ok=True)
        where = traceback.extract_tb(err.__traceback__)[-1]
        place = f"{type(err).__name__}:{where.filename}:{where.lineno}:{getattr(err, 'key', '')}"
        key = hashlib.sha1(place.encode()).hexdigest()[:12]
        path = self.errors / key
        if not path.exists():
            path.mkdir(exist_ok=True)
            write_atomic(path / "input", data)
            write_atomic(path / "error.txt", "".join(traceback.format_exception(err)))


def _number(value, default: float = 0.0) -> float:
    import math
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return default
    return value


def read_workers(crashes: Path) -> list[dict]:
    """Every worker's progress, as WorkerStats.write leaves it; a file of
    anything else (junk, another version's) is read as far as it makes
    sense: fields of the wrong type count as absent."""
    out = []
    for p in sorted((Path(crashes) / ".workers").glob("*.json")):
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError, RecursionError):
            continue
        if not isinstance(data, dict):
            continue
        pid = data.get("pid")
        out.append({"pid": pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
                    "begun": _number(data.get("begun")), "updated": _number(data.get("updated")),
                    "execs": int(_number(data.get("execs"))), "rss_kb": _number(data.get("rss_kb")),
                    "final": data.get("final") is True})
    return out

