"""`stepfuzz triage DIR`: a night's crash directory as one row per root cause.

A crash directory holds one root cause: the kernel mechanism behind a
divergence (stepfuzz.oracle.kvm.attribute) and the kind of divergence a
VMM sees, however many eras show it and under whatever incidental events.
Directories written before root causes held one per-era signature each;
triage attributes their case on read, so they fall into the same rows.
Each row says what a VMM sees, the mechanism and the kernel function
behind it, the eras and kernels affected, the commit that fixed it and the
first release with the fix -- or that no release has: a new-bug candidate.
"""
from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepfuzz.oracle.kvm.eras import ERA_IDS, ERAS, POLICY_POINTS

from stepfuzz.fuzz.findings.crashdir import CrashDir, DivergenceRecord, UnreadableRecord, scan, write_atomic
from stepfuzz.fuzz.findings.rootcause import MODEL_GAP_PREFIX, REAL_PREFIX, root_of

SEES = {"zero-step": "a stop with no instruction stepped",
        "multi-step": "two or more instructions in one step",
        "missing-stop": "instructions run with no stop for them",
        "skipped-instruction": "an instruction skipped without running",
        "extra-stop": "a stop the architecture does not take",
        "pc-mismatch": "a stop at the wrong PC",
        "outcome-mismatch": "the run ends differently",
        "state-mismatch": "a different final guest state"}
COLUMNS = ["what a VMM sees", "mechanism", "eras", "kernels", "fixed by", "hits", "first seen", "last seen",
           "smallest reproducer"]


@dataclass(frozen=True)
class Member:
    """One crash directory of a row."""
    record: DivergenceRecord
    dir: CrashDir
    reproducer: Path              # minimized.json if there is one, else case.json
    insns: int                    # its instructions
    root: dict[str, Any]          # its RootCause as JSON (from the record, or attributed on read)

    @property
    def eras(self) -> dict[str, int]:
        return dict(self.record.eras) if self.record.eras else {self.record.era: self.record.count}

    @property
    def signatures(self) -> dict[str, int]:
        return dict(self.record.signatures) if self.record.signatures else {self.record.signature: self.record.count}


@dataclass
class Row:
    """One root cause, from all the directories that hold it."""
    root: dict[str, Any]
    members: list[Member] = field(default_factory=list)
    real: dict[str, str] = field(default_factory=dict)     # kernel -> what it showed

    @property
    def signature(self) -> str:
        return self.root["signature"]

    @property
    def kind(self) -> str:
        return self.root["kind"]

    @property
    def eras(self) -> list[str]:
        seen = {e for m in self.members for e in m.eras}
        return [e for e in ERA_IDS if e in seen]

    @property
    def kernels(self) -> list[str]:
        return [ERAS[e].kernels for e in self.eras]

    @property
    def hits(self) -> int:
        return sum(m.record.count for m in self.members)

    @property
    def signatures(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.members:
            for s, n in m.signatures.items():
                out[s] = out.get(s, 0) + n
        return dict(sorted(out.items()))

    @property
    def first_seen(self) -> str:
        return min(m.record.first_seen for m in self.members)

    @property
    def last_seen(self) -> str:
        return max(m.record.last_seen for m in self.members)

    @property
    def smallest(self) -> Member:
        return min(self.members, key=lambda m: (m.insns, ERA_IDS.index(m.record.era) if m.record.era in ERA_IDS else 99))

    @property
    def model_gap(self) -> bool:
        """A real kernel does not do what its era model says: a bug in stepfuzz."""
        return self.signature.startswith(MODEL_GAP_PREFIX)

    @property
    def new_bug_candidate(self) -> bool:
        return not self.root["fixed_by"] and not self.model_gap

    def mechanism_text(self) -> str:
        """The policy points in a KVM developer's words: the kernel function,
        what it decides, and the choice that fixed it."""
        if self.signature.startswith((MODEL_GAP_PREFIX, REAL_PREFIX)):
            return self.root["explanation"]
        if self.signature.startswith("unexplained:"):
            return "not explained by any policy point the era models have: a gap in the models, or an oracle bug"
        parts = []
        for point in self.root.get("points", []):
            name, _, value = point.partition("=")
            known = POLICY_POINTS.get(name)
            parts.append(f"{known.function}: {known.decides} (fixed as {name}={value})" if known else point)
        return "; ".join(parts) or self.root["mechanism"]

    def fixed_text(self) -> str:
        if self.model_gap:
            return "MODEL GAP: a bug in stepfuzz (fix the era model or document the limit)"
        if self.signature.startswith(REAL_PREFIX):
            return "NEW-BUG CANDIDATE: seen on a real kernel, no model explains it"
        if self.new_bug_candidate:
            return "NEW-BUG CANDIDATE: no release changed it" + (
                " (the architecture's state machine would)" if self.signature.startswith("candidate:") else "")
        return f"{', '.join(self.root['fixed_by'])} ({self.root['fixed_in']})"

    def to_json(self) -> dict[str, Any]:
        small = self.smallest
        return {"signature": self.signature, "mechanism": self.root["mechanism"], "kind": self.kind,
                "sees": SEES.get(self.kind, self.kind), "explanation": self.mechanism_text(),
                "functions": self.root["functions"], "eras": self.eras, "kernels": self.kernels,
                "fixed_by": self.root["fixed_by"], "fixed_in": self.root["fixed_in"],
                "new_bug_candidate": self.new_bug_candidate, "signatures": self.signatures, "hits": self.hits,
                "first_seen": self.first_seen, "last_seen": self.last_seen,
                "reproducer": str(small.reproducer), "reproducer_insns": small.insns, "reproducer_era": small.record.era,
                "dirs": [str(m.dir) for m in self.members], **({"real": self.real} if self.real else {})}


@dataclass
class Collected:
    """The rows of a crash directory, and the findings that could not be read
    (each named, for a warning)."""
    rows: list[Row]
    unreadable: list[UnreadableRecord]

    @property
    def buckets(self) -> list[Row]:           # the name real-kernel triage uses
        return self.rows


def collect(crashes: Path) -> Collected:
    from stepfuzz.oracle.case import CaseError, load_case
    rows: dict[str, Row] = {}
    found = scan(crashes)
    unreadable = list(found.unreadable)
    for f in found:
        reproducer, insns = f.dir.reproducer, f.record.case_insns
        if reproducer == f.dir.minimized:
            try:
                insns = len(load_case(reproducer).words)
            except CaseError as e:        # reported; the finding stays, replayed from case.json
                unreadable.append(UnreadableRecord(reproducer, f"{e.where}: {e.problem}" if e.where else e.problem))
                reproducer = f.dir.case
        try:
            root = root_of(f.dir, f.record)
        except UnreadableRecord as e:
            unreadable.append(e)
            continue
        member = Member(f.record, f.dir, reproducer, insns, root)
        row = rows.setdefault(root["signature"], Row(root))
        row.members.append(member)
        mark = f.record.kernel
        if mark is not None:          # found by a campaign on a real kernel
            row.real[f"Linux {mark.get('version') or mark.get('name', '?')}"] = (
                "model gap" if row.model_gap else "shows it (campaign, image sha256 "
                f"{str(mark.get('sha256', ''))[:12]})")
    order = sorted(rows.values(), key=lambda r: (not r.new_bug_candidate, r.kind, r.signature))
    return Collected(order, unreadable)


def _cells(row: Row, reproducer: str, show_real: bool) -> list[str]:
    out = [SEES.get(row.kind, row.kind), row.mechanism_text(), ", ".join(row.eras), "; ".join(row.kernels),
           row.fixed_text(), str(row.hits), row.first_seen, row.last_seen, reproducer]
    if show_real:
        out.append(", ".join(f"{k}: {v}" for k, v in sorted(row.real.items())) or "-")
    return out


def _md(text: str) -> str:
    """A table cell: no pipes or line breaks, no control characters."""
    return "".join(ch if ch.isprintable() else " " for ch in text).replace("|", "\\|")


def markdown(rows: list[Row], title: str) -> str:
    show_real = any(r.real for r in rows)
    cols = COLUMNS + ["real kernels"] * show_real
    candidates = sum(r.new_bug_candidate for r in rows)
    lines = [f"# {_md(title)}", "",
             f"{len(rows)} root causes ({candidates} new-bug candidates), "
             f"{sum(len(r.members) for r in rows)} crash directories, {sum(r.hits for r in rows)} hits.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        small = r.smallest
        repro = (f"`{small.reproducer}` ({small.insns} insns, "
                 f"`stepfuzz run {small.reproducer} --era {small.record.era}`)")
        lines.append("| " + " | ".join(_md(c) for c in _cells(r, repro, show_real)) + " |")
    lines += ["", "## Root causes and the per-era signatures they collect", ""]
    for r in rows:
        lines.append(f"- `{_md(r.signature)}`: " + ", ".join(f"`{_md(s)}` x{n}" for s, n in r.signatures.items()))
    return "\n".join(lines) + "\n"


def json_lines(rows: list[Row]) -> str:
    return "".join(json.dumps(r.to_json()) + "\n" for r in rows)


SORT_SCRIPT = """
document.querySelectorAll('th').forEach((th, col) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0];
  const down = th.dataset.down !== '1'; th.dataset.down = down ? '1' : '0';
  const key = tr => { const t = tr.children[col].dataset.key ?? tr.children[col].textContent;
                      return isNaN(t) || t === '' ? t : Number(t); };
  [...body.rows].sort((a, b) => { const x = key(a), y = key(b);
                                  return (x < y ? -1 : x > y ? 1 : 0) * (down ? 1 : -1); })
                .forEach(tr => body.appendChild(tr));
}));
"""


def _href(path: Path, page: Path) -> str:
    try:
        rel = os.path.relpath(path.resolve(), page.resolve().parent)
    except ValueError:
        rel = str(path.resolve())
    return html.escape(rel.replace(os.sep, "/"), quote=True)


def to_html(rows: list[Row], title: str, page: Path) -> str:
    """A page a person reads: sortable by any column (click its header), each
    reproducer and report a link relative to the page."""
    show_real = any(r.real for r in rows)
    cols = COLUMNS + ["real kernels"] * show_real
    body = []
    for r in rows:
        small = r.smallest
        cells = [html.escape(c) for c in _cells(r, "", show_real)]
        cells[8] = (f"<a href='{_href(small.reproducer, page)}'>{html.escape(small.reproducer.name)}</a> "
                    f"({small.insns} insns, era {html.escape(small.record.era)}) "
                    f"<a href='{_href(small.dir.report, page)}'>report</a>")
        cls = " class='candidate'" if r.new_bug_candidate else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font:14px sans-serif;margin:1.5em}td,th{border:1px solid #ccc;padding:4px;"
            "font-size:13px;vertical-align:top}th{cursor:pointer;background:#eee}table{border-collapse:collapse}"
            "tr.candidate td:first-child{border-left:4px solid #c00}</style>"
            f"<h1>{html.escape(title)}</h1><p>{len(rows)} root causes "
            f"({sum(r.new_bug_candidate for r in rows)} new-bug candidates, marked red). "
            "Click a column header to sort.</p>"
            "<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr></thead><tbody>"
            + "".join(body) + f"</tbody></table><script>{SORT_SCRIPT}</script>\n")


def write_html(rows: list[Row], title: str, page: Path) -> None:
    write_atomic(page, to_html(rows, title, page))
