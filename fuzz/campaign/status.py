"""`stepfuzz status DIR` and `stepfuzz plot DIR`: read a campaign's crash directory."""
from __future__ import annotations

import html
import json
import os
import time
from collections import Counter
from pathlib import Path

from stepfuzz.fuzz.findings.store import crash_records, read_json


def stats(crashes: Path) -> list[dict]:
    path = crashes / "stats.jsonl"
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue          # a line cut by a kill: skip it
    return out


def divergences(crashes: Path) -> list[dict]:
    return [{**info, "dir": str(d)} for d, info in crash_records(crashes)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except (OSError, TypeError):
        return False


def status(crashes: Path) -> str:
    camp = read_json(crashes / "campaign.json") or {}
    records = stats(crashes)
    divs = divergences(crashes)
    workers = [read_json(p) or {} for p in (crashes / ".workers").glob("*.json")]
    running = [w for w in workers if not w.get("final") and _alive(w.get("pid"))
               and time.time() - w.get("updated", 0) < 60]
    last = records[-1] if records else {}
    lines = [f"campaign {crashes}: {'RUNNING (' + str(len(running)) + ' workers)' if running else 'not running'}"]
    if camp:
        lines.append(f"  started {camp.get('started_iso', '?')}, seed {camp.get('seed')}, eras {camp.get('eras')}, "
                     f"jobs {camp.get('jobs')}, corpus {camp.get('corpus')}")
    if last:
        lines.append(f"  elapsed {last['elapsed_s']:.0f} s, {last['execs']:,} execs ({last['execs_per_s']:.0f}/s at the last record), "
                     f"corpus {last['corpus']}, cov {last['cov']}, ft {last['ft']}, rss {last['rss_mb']} MB")
    by_era = Counter(d["era"] for d in divs)
    lines.append(f"  {len(divs)} unique divergences: " + (" ".join(f"{k}:{v}" for k, v in sorted(by_era.items())) or "none"))
    for d in sorted(divs, key=lambda d: (d["era"], d["kind"], d["signature"])):
        lines.append(f"    {d['signature']:<48} x{d.get('count', 0):<7} first {d.get('first_seen', '?')}  "
                     f"{d.get('case_insns', '?')} insns  {d['dir']}")
    errors = list((crashes / ".oracle-errors").glob("*")) if (crashes / ".oracle-errors").exists() else []
    if errors:
        lines.append(f"  {len(errors)} oracle error(s) (stepfuzz bugs) in {crashes / '.oracle-errors'}")
    return "\n".join(lines)


def _chart(title: str, points: list[tuple[float, float]], width: int = 640, height: int = 200) -> str:
    if not points:
        return f"<h2>{html.escape(title)}</h2><p>no data</p>"
    xmax = max(x for x, _ in points) or 1
    ymax = max(y for _, y in points) or 1
    pad = 40
    coords = " ".join(f"{pad + (width - 2 * pad) * x / xmax:.1f},{height - pad - (height - 2 * pad) * y / ymax:.1f}"
                      for x, y in points)
    return (f"<h2>{html.escape(title)}</h2><svg width='{width}' height='{height}' style='border:1px solid #ccc'>"
            f"<polyline fill='none' stroke='#1f77b4' stroke-width='2' points='{coords}'/>"
            f"<text x='{pad}' y='{height - 10}' font-size='12'>0 s</text>"
            f"<text x='{width - pad - 60}' y='{height - 10}' font-size='12'>{xmax:.0f} s</text>"
            f"<text x='2' y='{pad - 10}' font-size='12'>{ymax:,.0f}</text></svg>")


def plot(crashes: Path, out: Path) -> None:
    records = stats(crashes)
    t0 = records[0]["t"] if records else 0      # wall time, so resumed campaigns line up
    charts = [
        _chart("executions per second", [(r["t"] - t0, r["execs_per_s"]) for r in records]),
        _chart("coverage (libFuzzer cov)", [(r["t"] - t0, r["cov"]) for r in records]),
        _chart("unique divergences", [(r["t"] - t0, r["unique"]) for r in records]),
    ]
    body = "\n".join(charts)
    out.write_text(f"<!doctype html><meta charset='utf-8'><title>stepfuzz campaign {html.escape(str(crashes))}</title>"
                   f"<h1>stepfuzz campaign: {html.escape(str(crashes))}</h1>{body}\n")
