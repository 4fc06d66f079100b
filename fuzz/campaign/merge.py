"""Combine the work of several machines.

`corpus_merge`: libFuzzer's -merge=1 over the harness (inputs that add
coverage features, smallest first), resumable through a control file, then
topped up so that every divergence signature any input showed is still
shown by some kept input.

`crashes_merge`: one directory per signature in the output; counts summed,
first/last seen widened, the smallest case kept.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from stepfuzz.oracle.kvm.eras import Era, select
from stepfuzz.oracle.run import check

from stepfuzz.fuzz.campaign.supervisor import harness_launcher
from stepfuzz.fuzz.findings.crashdir import CrashDir, DivergenceRecord, UnreadableRecord, crash_dirs, root_id, scan
from stepfuzz.fuzz.findings.rootcause import root_of
from stepfuzz.fuzz.findings.store import write_atomic
from stepfuzz.fuzz.inputs.encoding import MAX_STEPS_BOUND, NotACase, decode_input

CONTROL = ".merge_control"


def signatures(data: bytes, eras: list[Era], max_steps: int) -> set[str]:
    """The divergence signatures an input shows, checked as the harness checks it."""
    try:
        case = decode_input(data)
    except NotACase:
        return set()
    return {r.divergence.signature for r in check(case.bounded(max_steps), eras, first_divergence_only=True)
            if r.divergence}


def _inputs(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))


def corpus_merge(sources: list[Path], out: Path, eras: str = "all", max_steps: int = MAX_STEPS_BOUND,
                 log=lambda m: None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    out, sources = out.resolve(), [s.resolve() for s in sources]
    control = out / CONTROL
    with tempfile.TemporaryDirectory(prefix="stepfuzz-merge-") as tmp:
        # STEPFUZZ_SUPERVISOR: libFuzzer's merge processes stop when this one is killed
        env = {**os.environ, "STEPFUZZ_ERAS": eras, "STEPFUZZ_CRASHES": tmp,
               "STEPFUZZ_MAX_STEPS": str(max_steps), "STEPFUZZ_SUPERVISOR": str(os.getpid())}
        argv = [str(harness_launcher()), "-merge=1", f"-merge_control_file={control}", "-max_len=4096",
                str(out), *map(str, sources)]
        if control.exists():
            log(f"resuming the merge recorded in {control}")
        p = subprocess.run(argv, env=env, cwd=tmp, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"libFuzzer merge failed (status {p.returncode}): "
                               + (p.stderr.strip().splitlines() or ["no output"])[-1])
    control.unlink(missing_ok=True)
    era_list = select(eras)
    kept = {s for f in _inputs(out) for s in signatures(f.read_bytes(), era_list, max_steps)}
    added = 0
    for src in sources:
        for f in _inputs(src):
            data = f.read_bytes()
            name = out / hashlib.sha1(data).hexdigest()     # named by content, as libFuzzer names inputs
            if name.exists():
                continue                # kept already: its signatures are counted
            missing = signatures(data, era_list, max_steps) - kept
            if missing:
                write_atomic(name, data)
                kept |= missing
                added += 1
    return {"inputs": len(_inputs(out)), "signatures": len(kept), "added_for_signatures": added}


@dataclass
class CrashesMerged:
    signatures: int                 # findings in the output
    merged_duplicates: int          # findings a source shared with the output
    unreadable: list[UnreadableRecord] = field(default_factory=list)    # left out (a source's) or replaced (the output's)


class SameDirectory(ValueError):
    """A merge whose output is one of its inputs (or inside one)."""


def crashes_merge(sources: list[Path], out: Path) -> CrashesMerged:
    """One directory per root cause in `out`: findings of several campaigns
    (and of the version before root causes, attributed on the way) merged.
    Hits are counted per original finding (`origins`), so merging the same
    source again, or a copy of it, changes nothing.  Never follows a symlink."""
    for src in sources:
        if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
            raise SameDirectory(f"{out}: the output is {src}, an input of the merge")
    out.mkdir(parents=True, exist_ok=True)
    merged = 0
    unreadable: list[UnreadableRecord] = []
    for src in sources:
        found = scan(src)
        unreadable += found.unreadable
        for f in found:
            if f.dir.path.is_symlink():
                unreadable.append(UnreadableRecord(f.dir.path, "a symbolic link: not followed"))
                continue
            try:
                root = root_of(f.dir, f.record)
            except UnreadableRecord as e:
                unreadable.append(e)
                continue
            theirs = _as_root_record(f.record, root)
            dest = CrashDir(out / theirs.id)
            try:
                mine = dest.read_record() if dest.is_finding() else None
            except UnreadableRecord as e:
                unreadable.append(UnreadableRecord(e.path, f"{e.problem} (replaced by {f.dir.record_path})"))
                mine = None
            if mine is None:
                dest.path.mkdir(exist_ok=True)
                problems = dest.take_case_from(f.dir)
                unreadable += [UnreadableRecord(f.dir.path, why) for why in problems]
                if problems:              # a finding without its case is no finding: left out
                    if not any(dest.path.iterdir()):
                        dest.path.rmdir()
                    continue
                dest.write_record(theirs)
                continue
            merged += 1
            origins = mine.hits_by_origin()
            for origin, n in theirs.hits_by_origin().items():
                origins[origin] = max(origins.get(origin, 0), n)      # the same finding again: not new hits
            mine = replace(mine, origins=origins, count=sum(origins.values()),
                           first_seen=min(mine.first_seen, theirs.first_seen),
                           last_seen=max(mine.last_seen, theirs.last_seen),
                           eras=_union(mine.eras, theirs.eras), signatures=_union(mine.signatures, theirs.signatures))
            if theirs.kept_key() < mine.kept_key():
                problems = dest.take_case_from(f.dir)
                unreadable += [UnreadableRecord(f.dir.path, why) for why in problems]
                if not problems:          # the divergence as the kept case shows it (its stop, detail, size)
                    mine = mine.describing(theirs)
            dest.write_record(mine)
    return CrashesMerged(sum(1 for _ in crash_dirs(out)), merged, unreadable)


def _as_root_record(record, root: dict) -> "DivergenceRecord":
    """A record as a root cause's directory holds it: named after the root
    cause, with its eras, signatures and origins (a record of the version
    before root causes gets them from its one era and signature)."""
    return replace(record, id=root_id(root["signature"]), root_cause=root,
                   eras=record.eras or {record.era: record.count},
                   signatures=record.signatures or {record.signature: record.count},
                   origins=record.hits_by_origin())


def _union(a, b) -> dict[str, int]:
    """Hit counts of two records of one root cause (per era, per signature):
    the larger of each, since the same finding may be in both."""
    out = dict(a or {})
    for k, n in (b or {}).items():
        out[k] = max(out.get(k, 0), n)
    return out
