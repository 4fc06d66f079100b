"""`stepfuzz status DIR` and `stepfuzz plot DIR`: read a campaign's crash directory."""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from stepfuzz.fuzz.findings.crashdir import Finding, UnreadableRecord, printable, scan
from stepfuzz.fuzz.findings.store import read_json
from stepfuzz.fuzz.harness.workers import read_workers


class NotACampaign(ValueError):
    """A directory without a campaign's statistics; str() is one line."""


@dataclass
class Status:
    """`stepfuzz status`: the text, and the findings that could not be read
    (each named, for a warning; the text shows all the others)."""
    text: str
    unreadable: list[UnreadableRecord] = field(default_factory=list)


def stats(crashes: Path) -> list[dict]:
    path = crashes / "stats.jsonl"
    out = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                continue          # a line cut by a kill, or junk: skip it
            if isinstance(record, dict) and all(_is_number(record.get(k)) for k in STATS_FIELDS):
                out.append(record)
    return out


# what `stepfuzz status` and `plot` read from each record of stats.jsonl
STATS_FIELDS = ("t", "elapsed_s", "execs", "execs_per_s", "corpus", "cov", "ft", "rss_mb")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def divergences(crashes: Path) -> tuple[list[Finding], list[UnreadableRecord]]:
    found = scan(crashes)
    return found.findings, found.unreadable


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except (OSError, TypeError):
        return False


def status(crashes: Path) -> Status:
    camp = read_json(crashes / "campaign.json") or {}
    records = stats(crashes)
    divs, unreadable = divergences(crashes)
    workers = read_workers(crashes)
    running = [w for w in workers if not w["final"] and _alive(w["pid"]) and time.time() - w["updated"] < 60]
    last = records[-1] if records else {}
    lines = [f"campaign {crashes}: {'RUNNING (' + str(len(running)) + ' workers)' if running else 'not running'}"]
    mark = camp.get("kernel_mark")
    if isinstance(mark, dict):
        lines.append(f"  target: Linux {mark.get('version', '?')} ({mark.get('name', '?')}, image sha256 "
                     f"{str(mark.get('sha256', ''))[:16]}...), compared with era {camp.get('eras')}")
    if isinstance(last.get("restarts"), int):
        lines.append(f"  VM boots {last.get('boots')}, restarts {last['restarts']}; verdicts {last.get('verdicts')}")
    if camp:
        lines.append(f"  started {camp.get('started_iso', '?')}, seed {camp.get('seed')}, eras {camp.get('eras')}, "
                     f"jobs {camp.get('jobs')}, corpus {camp.get('corpus')}")
    if last:
        lines.append(f"  elapsed {last['elapsed_s']:.0f} s, {last['execs']:,} execs ({last['execs_per_s']:.0f}/s at the last record), "
                     f"corpus {last['corpus']}, cov {last['cov']}, ft {last['ft']}, rss {last['rss_mb']} MB")
    by_era = Counter(e for f in divs for e in (f.record.eras or {f.record.era: 1}))
    lines.append(f"  {len(divs)} crash directories (root causes; `stepfuzz triage` groups older ones), seen on: "
                 + (" ".join(f"{k}:{v}" for k, v in sorted(by_era.items())) or "none"))
    for f in sorted(divs, key=lambda f: (f.record.root_signature or "~" + f.record.signature)):
        r = f.record
        name = r.root_signature or f"{r.signature} (per-era, before root causes)"
        on = f"  on Linux {r.kernel.get('version', '?')}" if r.kernel else ""
        lines.append(f"    {name:<48} x{r.count:<7} first {r.first_seen}  "
                     f"{r.case_insns} insns  {f.dir}{on}")
    errors = list((crashes / ".oracle-errors").glob("*")) if (crashes / ".oracle-errors").exists() else []
    if errors:
        lines.append(f"  {len(errors)} oracle error(s) (stepfuzz bugs) in {crashes / '.oracle-errors'}")
    return Status("\n".join(printable(line) for line in lines), unreadable)


def plot(crashes: Path, out: Path) -> None:
    """Raises NotACampaign for a directory without stats.jsonl."""
    if not (crashes / "stats.jsonl").exists():
        raise NotACampaign(f"{crashes}: no stats.jsonl (not a campaign's crash directory?)")
    from stepfuzz.fuzz.campaign.plot import write_plot
    write_plot(stats(crashes), crashes, out)
