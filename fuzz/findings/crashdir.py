"""The crash directory: the one place that knows its files and their format.

    <root>/<id>/case.json        the smallest case seen with the signature (replayable)
    <root>/<id>/divergence.json  its DivergenceRecord: what diverged, where, how often, when
    <root>/<id>/report.txt       side-by-side stops with disassembly
    <root>/<id>/minimized.json   after `stepfuzz minimize`: the case shrunk to its cause
    <root>/<id>/.lock            taken for every read-modify-write of divergence.json

A directory is a finding if and only if it holds divergence.json: that file
is written last, so a directory being created (or one a kill left behind
before it) is not a finding yet.  Everything else under a root --
stats.jsonl, campaign.json, .workers/, .oracle-errors/, logs/, artifacts/,
plain files -- is not a finding and no error.

A divergence.json that cannot be read (not JSON, not an object, a field
missing or of the wrong type, a date that is not ISO 8601) is never skipped
in silence: reading it raises UnreadableRecord, whose str() names the file
and the problem on one line, and `scan` collects them next to the findings
it could read, for the caller to report and go on.

Every file is written to a temporary name and renamed (`write_atomic`), so a
kill never leaves a half-written one.  Imports nothing that runs the oracle.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Mapping


def now_iso(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, timezone.utc).isoformat(timespec="seconds")


class OutputError(OSError):
    """A file that cannot be written, or must not be replaced; str() is one
    line naming it."""


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write then rename: a killed process leaves the old file or the new one,
    never half of one, and a failure leaves no temporary file.  Only a
    regular file is ever replaced: a symbolic link, a device or a directory
    at `path` is refused.  (No fsync: that guards against power loss, not
    kills, and costs milliseconds per file in the fuzzing loop.)"""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise OutputError(f"{path}: not a regular file: not replaced")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OutputError):
            raise
        raise OutputError(f"{path}: cannot write: {e.strerror or e}") from None


def printable(text: str) -> str:
    """Text from a record as a terminal or a report may show it: control
    characters (an ANSI escape in a record another program wrote) become '?'."""
    return "".join(ch if ch.isprintable() else "?" for ch in str(text))


@lru_cache(maxsize=4096)    # the harness asks for every divergent result, of a few dozen root causes
def root_id(signature: str) -> str:
    """The name of a root cause's directory: a short hash of its signature."""
    return hashlib.sha1(signature.encode()).hexdigest()[:12]


# ---------------------------------------------------------------- the record

class UnreadableRecord(ValueError):
    """A divergence.json (or another file of a finding) that cannot be read;
    str() is one line: the file, then the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = " ".join(str(problem).split())         # one line, whatever it quotes
        super().__init__(f"{self.path}: {self.problem}")


def _a(value: Any) -> str:
    """The JSON type of a decoded value, with its article."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 40 else text[:37] + "..."


def _what(value: Any) -> str:
    """`a string ("x")`, `null`: a value as a problem names it."""
    return "null" if value is None else f"{_a(value)} ({_show(value)})"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_KINDS = {"string": lambda v: isinstance(v, str), "integer": _is_int, "number": _is_number,
          "object": lambda v: isinstance(v, dict)}


class _Fields:
    """Typed access to one decoded JSON object; each problem raised as
    UnreadableRecord naming the field (`first_found.execs`)."""

    def __init__(self, data: Any, path: str | Path, prefix: str = ""):
        if not isinstance(data, dict):
            raise UnreadableRecord(path, f'field "{prefix[:-1]}" is {_what(data)}, not an object' if prefix
                                   else f"not a JSON object ({_a(data)})")
        self.data, self.path, self.prefix = data, path, prefix

    def raw(self, name: str) -> Any:
        if name not in self.data:
            raise UnreadableRecord(self.path, f'missing field "{self.prefix}{name}"')
        return self.data[name]

    def get(self, name: str, kind: str, optional: bool = False) -> Any:
        if name not in self.data:
            if optional:
                return None
            raise UnreadableRecord(self.path, f'missing field "{self.prefix}{name}"')
        v = self.data[name]
        if not _KINDS[kind](v):
            article = "an" if kind[0] in "aeiou" else "a"
            raise UnreadableRecord(self.path, f'field "{self.prefix}{name}" is {_what(v)}, not {article} {kind}')
        return v

    def date(self, name: str) -> str:
        v = self.get(name, "string")
        try:
            datetime.fromisoformat(v)
        except ValueError:
            raise UnreadableRecord(self.path, f'field "{self.prefix}{name}" is not an ISO 8601 date: {_show(v)}') from None
        return v

    def extra(self, known: tuple[str, ...]) -> dict[str, Any]:
        return {k: v for k, v in self.data.items() if k not in known}


@dataclass(frozen=True)
class StopRecord:
    """One stop of a divergence, as divergence.json shows it (`expected`, `got`)."""
    pc: int
    steps: int
    isv: int
    extra: Mapping[str, Any] = field(default_factory=dict)     # keys a later version wrote

    KEYS = ("pc", "steps", "isv")

    @classmethod
    def from_json(cls, data: Any, path: str | Path, name: str) -> StopRecord | None:
        if data is None:
            return None
        f = _Fields(data, path, name + ".")
        return cls(f.get("pc", "integer"), f.get("steps", "integer"), f.get("isv", "integer"), f.extra(cls.KEYS))

    def to_json(self) -> dict[str, Any]:
        return {"pc": self.pc, "steps": self.steps, "isv": self.isv, **self.extra}


@dataclass(frozen=True)
class FirstFound:
    """Who found a signature first, and how far into its campaign."""
    worker: str
    elapsed_s: float          # seconds since the campaign started
    execs: int                # the worker's executions by then
    extra: Mapping[str, Any] = field(default_factory=dict)

    KEYS = ("worker", "elapsed_s", "execs")

    @classmethod
    def from_json(cls, data: Any, path: str | Path) -> FirstFound:
        f = _Fields(data, path, "first_found.")
        return cls(f.get("worker", "string"), f.get("elapsed_s", "number"), f.get("execs", "integer"),
                   f.extra(cls.KEYS))

    def to_json(self) -> dict[str, Any]:
        return {"worker": self.worker, "elapsed_s": self.elapsed_s, "execs": self.execs, **self.extra}


# The keys of divergence.json in the order the store writes a new record.
# `detail` is there only when the divergence has one; keys a later version
# added are kept (`extra`) and written back where they were read.
RECORD_KEYS = ("kind", "stop", "signature", "id", "cause", "title", "expected", "got", "detail",
               "era", "kernels", "first_seen", "last_seen", "count", "case_insns", "first_found",
               "root_cause", "eras", "signatures", "origins", "case_timed")
# what a sighting of the root cause says, rather than the divergence a kept case shows
SIGHTING_KEYS = ("count", "first_seen", "last_seen", "first_found", "eras", "signatures", "origins")


@dataclass(frozen=True)
class DivergenceRecord:
    """divergence.json: one signature, the stop where its kept case diverges,
    and its sightings.  Change it with dataclasses.replace or `updated`;
    to_json() writes the keys in the order they were read (new ones last, as
    a dict update would), so a record read and written back unchanged is the
    same file, byte for byte."""
    kind: str
    stop: int
    signature: str
    id: str
    cause: str
    title: str
    expected: StopRecord | None
    got: StopRecord | None
    era: str
    kernels: str
    first_seen: str           # ISO 8601, as written (compared as text: one format, UTC)
    last_seen: str
    count: int
    case_insns: int           # instructions of case.json
    first_found: FirstFound
    detail: str | None = None
    # Since root causes: the directory is one root cause (`root_cause`, its
    # RootCause as JSON, whose signature names the directory), seen on these
    # eras and under these per-era signatures, with their hits.  Records
    # written before have none of the three (triage attributes them on read).
    root_cause: Mapping[str, Any] | None = None
    eras: Mapping[str, int] | None = None
    signatures: Mapping[str, int] | None = None
    # merged records: the hits each original finding brought (by `origin`),
    # so that merging the same directory again adds nothing
    origins: Mapping[str, int] | None = None
    case_timed: bool | None = None    # case.json needs an instruction-timed event (models only)
    extra: Mapping[str, Any] = field(default_factory=dict)
    order: tuple[str, ...] = field(default=(), compare=False, repr=False)   # key order as read

    @property
    def root_signature(self) -> str | None:
        return self.root_cause.get("signature") if self.root_cause else None

    @property
    def kernel(self) -> dict[str, Any] | None:
        """The real kernel a campaign on one saw it on (Kernel.mark()), None for the models'."""
        mark = self.extra.get("kernel")
        return mark if isinstance(mark, dict) else None

    @classmethod
    def from_json(cls, data: Any, path: str | Path = "divergence.json") -> DivergenceRecord:
        """The record of decoded JSON; UnreadableRecord(path, problem) for anything else."""
        f = _Fields(data, path)
        s = lambda name: f.get(name, "string")
        i = lambda name: f.get(name, "integer")
        return cls(kind=s("kind"), stop=i("stop"), signature=s("signature"), id=s("id"), cause=s("cause"),
                   title=s("title"),
                   expected=StopRecord.from_json(f.raw("expected"), path, "expected"),
                   got=StopRecord.from_json(f.raw("got"), path, "got"),
                   era=s("era"), kernels=s("kernels"), first_seen=f.date("first_seen"),
                   last_seen=f.date("last_seen"), count=i("count"), case_insns=i("case_insns"),
                   first_found=FirstFound.from_json(f.get("first_found", "object"), path),
                   detail=f.get("detail", "string", optional=True),
                   root_cause=_root_cause(f, path),
                   eras=_counts(f, "eras"), signatures=_counts(f, "signatures"), origins=_counts(f, "origins"),
                   case_timed=_flag(f, "case_timed"),
                   extra=f.extra(RECORD_KEYS), order=tuple(data))

    def to_json(self) -> dict[str, Any]:
        values: dict[str, Any] = {
            "kind": self.kind, "stop": self.stop, "signature": self.signature, "id": self.id,
            "cause": self.cause, "title": self.title,
            "expected": self.expected.to_json() if self.expected else None,
            "got": self.got.to_json() if self.got else None,
            **({"detail": self.detail} if self.detail is not None else {}),
            "era": self.era, "kernels": self.kernels, "first_seen": self.first_seen,
            "last_seen": self.last_seen, "count": self.count, "case_insns": self.case_insns,
            "first_found": self.first_found.to_json(),
            **({"root_cause": dict(self.root_cause)} if self.root_cause is not None else {}),
            **({"eras": dict(self.eras)} if self.eras is not None else {}),
            **({"signatures": dict(self.signatures)} if self.signatures is not None else {}),
            **({"origins": dict(self.origins)} if self.origins is not None else {}),
            **({"case_timed": self.case_timed} if self.case_timed is not None else {}),
            **self.extra}
        keys = [k for k in self.order if k in values] + [k for k in values if k not in self.order]
        return {k: values[k] for k in keys}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"

    def updated(self, fields: Mapping[str, Any]) -> DivergenceRecord:
        """This record with `fields` (JSON, e.g. Divergence.to_json() or part
        of another record) written over it, as a dict update: keys it has keep
        their place, new ones go last, keys `fields` lacks are kept."""
        return DivergenceRecord.from_json({**self.to_json(), **fields}, "divergence.json")

    def describing(self, other: DivergenceRecord) -> DivergenceRecord:
        """This record's sightings, everything else as `other` says (the
        divergence its case shows, the case's size, keys a later version wrote)."""
        return self.updated({k: v for k, v in other.to_json().items() if k not in SIGHTING_KEYS})

    @property
    def origin(self) -> str:
        """Who found this record's finding first, and when: the same in every
        copy of it, whatever merges it went through."""
        return f"{self.first_found.worker}@{self.first_seen}/{self.signature}"

    def kept_key(self) -> tuple[bool, int]:
        """Case.keep_key of the kept case: what a candidate must beat."""
        return (bool(self.case_timed), self.case_insns)

    def hits_by_origin(self) -> dict[str, int]:
        return dict(self.origins) if self.origins else {self.origin: self.count}

    @property
    def first_seen_at(self) -> datetime:
        return datetime.fromisoformat(self.first_seen)

    @property
    def last_seen_at(self) -> datetime:
        return datetime.fromisoformat(self.last_seen)


def _root_cause(f: _Fields, path: str | Path) -> dict[str, Any] | None:
    data = f.get("root_cause", "object", optional=True)
    if data is not None:
        sub = _Fields(data, path, "root_cause.")
        for name in ("signature", "kind", "mechanism", "explanation"):
            sub.get(name, "string")
        for name in ("fixed_by", "functions"):
            v = sub.raw(name)
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise UnreadableRecord(path, f'field "root_cause.{name}" is {_what(v)}, not a list of strings')
    return data


def _flag(f: _Fields, name: str) -> bool | None:
    v = f.data.get(name)
    if v is not None and not isinstance(v, bool):
        raise UnreadableRecord(f.path, f'field "{name}" is {_what(v)}, not true or false')
    return v


def _counts(f: _Fields, name: str) -> dict[str, int] | None:
    data = f.get(name, "object", optional=True)
    if data is not None:
        sub = _Fields(data, f.path, name + ".")
        for key in data:
            sub.get(key, "integer")
    return data


def read_record(path: str | Path) -> DivergenceRecord:
    """The DivergenceRecord in file `path`; UnreadableRecord if there is none to read."""
    path = Path(path)
    if path.exists() and not path.is_dir() and not path.is_file():
        raise UnreadableRecord(path, "not a regular file (a FIFO or a device): not read")
    try:
        if path.is_file() and path.stat().st_size > 16 << 20:
            raise UnreadableRecord(path, "larger than 16 MiB: not a record")
        raw = path.read_bytes()
    except IsADirectoryError:
        raise UnreadableRecord(path, "unreadable: a directory, not a file") from None
    except OSError as e:
        raise UnreadableRecord(path, f"unreadable: {e.strerror or e}") from None
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise UnreadableRecord(path, "not valid JSON: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise UnreadableRecord(path, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (ValueError, RecursionError) as e:
        raise UnreadableRecord(path, f"not valid JSON ({type(e).__name__})") from None
    return DivergenceRecord.from_json(data, path)


# ---------------------------------------------------------------- the directory

class CrashDir:
    """One finding's directory: its files' paths, reading and writing them."""
    CASE, RECORD, REPORT, MINIMIZED, LOCK = "case.json", "divergence.json", "report.txt", "minimized.json", ".lock"
    CASE_FILES = (CASE, REPORT, MINIMIZED)         # what a smaller case brings along (merges)

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def at(cls, root: str | Path, sig_id: str) -> CrashDir:
        return cls(Path(root) / sig_id)

    def __repr__(self) -> str:
        return f"CrashDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CrashDir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    @property
    def name(self) -> str:
        """The signature id the directory is named after."""
        return self.path.name

    @property
    def case(self) -> Path:
        return self.path / self.CASE

    @property
    def record_path(self) -> Path:
        return self.path / self.RECORD

    @property
    def report(self) -> Path:
        return self.path / self.REPORT

    @property
    def minimized(self) -> Path:
        return self.path / self.MINIMIZED

    @property
    def lock_path(self) -> Path:
        return self.path / self.LOCK

    @property
    def reproducer(self) -> Path:
        """The case to replay: minimized.json once there is one, else case.json."""
        return self.minimized if self.minimized.exists() else self.case

    def is_finding(self) -> bool:
        return self.record_path.exists()

    def claim(self) -> bool:
        """Make the directory; False if it already holds a finding (another
        worker or an earlier campaign has the signature).  One that exists
        without a record (a creation cut short) is taken over."""
        try:
            self.path.mkdir()
        except FileExistsError:
            return not self.is_finding()
        return True

    def read_record(self) -> DivergenceRecord:
        return read_record(self.record_path)

    def write_record(self, record: DivergenceRecord) -> None:
        write_atomic(self.record_path, record.dumps())

    def write_case(self, case: Mapping[str, Any], report: str) -> None:
        """case.json (a case as JSON) and report.txt."""
        write_atomic(self.case, json.dumps(case, indent=2) + "\n")
        write_atomic(self.report, report)

    @contextmanager
    def locked(self) -> Iterator[CrashDir]:
        """Hold the directory's lock: for a read-modify-write of its record."""
        with open(self.lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield self

    def take_case_from(self, other: CrashDir) -> list[str]:
        """The case files `other` has (case.json, report.txt, minimized.json)
        copied over these; returns the problems of any it does not copy: a
        symbolic link (never followed: it could name any file) or anything
        but a regular file."""
        sources = [other.path / name for name in self.CASE_FILES]
        problems = [f"{src}: not a regular file: not copied" for src in sources
                    if src.is_symlink() or (src.exists() and not src.is_file())]
        if not problems:                  # all or nothing: the record must describe the case beside it
            for src in sources:
                if src.exists():
                    write_atomic(self.path / src.name, src.read_bytes())
        return problems


def crash_dirs(root: str | Path) -> Iterator[CrashDir]:
    """Every finding's directory under `root` (those holding divergence.json),
    in name order, records unread."""
    root = Path(root)
    for d in sorted(root.iterdir()) if root.is_dir() else ():
        cd = CrashDir(d)
        if d.is_dir() and cd.is_finding():
            yield cd


@dataclass(frozen=True)
class Finding:
    dir: CrashDir
    record: DivergenceRecord


@dataclass
class Scan:
    """The findings under a root whose records could be read, in name order,
    and one UnreadableRecord for each that could not."""
    findings: list[Finding] = field(default_factory=list)
    unreadable: list[UnreadableRecord] = field(default_factory=list)

    def __iter__(self) -> Iterator[Finding]:
        return iter(self.findings)


def scan(root: str | Path) -> Scan:
    out = Scan()
    for cd in crash_dirs(root):
        try:
            out.findings.append(Finding(cd, cd.read_record()))
        except UnreadableRecord as e:
            out.unreadable.append(e)
    return out


# ---------------------------------------------------------------- minimize's work list

class BadTarget(ValueError):
    """What `stepfuzz minimize` was given cannot be minimized; str() is one line."""


@dataclass(frozen=True)
class MinimizeJob:
    case: Path                # the case to shrink
    label: str                # how progress names it
    era: str                  # the era id it diverges on
    out: Path                 # where the smaller case goes


def minimize_jobs(target: str | Path, era: str | None = None,
                  output: str | Path | None = None) -> tuple[list[MinimizeJob], list[UnreadableRecord]]:
    """What to minimize for a target: a case file (`era` needed; to `output`,
    default CASE.min.json beside it), one crash directory, or a directory of
    them (each its case.json into its minimized.json, on its record's era
    unless `era` is given).  Returns the jobs and the findings whose record
    could not be read; raises BadTarget, or UnreadableRecord for a lone crash
    directory's record."""
    target = Path(target)
    if target.is_dir():
        own = CrashDir(target)
        if own.is_finding():
            s = Scan([Finding(own, own.read_record())])
        else:
            s = scan(target)
        if not s.findings and not s.unreadable:
            raise BadTarget(f"{target}: neither a crash directory nor a directory of them (*/{CrashDir.RECORD})")
        return [MinimizeJob(f.dir.case, f.dir.name, era or f.record.era, f.dir.minimized) for f in s], s.unreadable
    if not era:
        raise BadTarget("--era is needed for a single case")
    out = Path(output) if output else target.with_name(target.stem + ".min.json")
    return [MinimizeJob(target, str(target), era, out)], []
