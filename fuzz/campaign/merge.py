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
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from stepfuzz.oracle.kvm.eras import Era, select
from stepfuzz.oracle.run import check

from stepfuzz.fuzz.campaign.supervisor import harness_launcher
from stepfuzz.fuzz.findings.store import crash_records, read_json, write_atomic
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
        env = {**os.environ, "STEPFUZZ_ERAS": eras, "STEPFUZZ_CRASHES": tmp,
               "STEPFUZZ_MAX_STEPS": str(max_steps)}
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


def crashes_merge(sources: list[Path], out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    merged = 0
    for src in sources:
        for d, info in crash_records(src):
            dest = out / d.name
            mine = read_json(dest / "divergence.json")
            if mine is None:
                shutil.copytree(d, dest, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns(".lock", ".*.tmp"))
                continue
            merged += 1
            mine["count"] = mine.get("count", 0) + info.get("count", 0)
            mine["first_seen"] = min(mine.get("first_seen", ""), info.get("first_seen", "")) or mine.get("first_seen", "")
            mine["last_seen"] = max(mine.get("last_seen", ""), info.get("last_seen", ""))
            if info.get("case_insns", 1 << 30) < mine.get("case_insns", 1 << 30):
                for name in ("case.json", "report.txt", "minimized.json"):
                    if (d / name).exists():
                        shutil.copy2(d / name, dest / name)
                # the divergence as the kept case shows it (its stop, detail, size)
                mine.update({k: v for k, v in info.items() if k not in ("count", "first_seen", "last_seen", "first_found")})
            write_atomic(dest / "divergence.json", json.dumps(mine, indent=2) + "\n")
    total = sum(1 for d in out.iterdir() if (d / "divergence.json").exists())
    return {"signatures": total, "merged_duplicates": merged}
