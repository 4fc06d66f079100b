"""`stepfuzz triage DIR`: a night's crash directory as a report a person can paste.

Each crash directory holds one signature (era/kind/cause).  Triage groups
signatures into buckets by root cause: the same effect (too few or too many
instructions per stop, an instruction skipped) with the same trigger,
whatever the era and however the run went on afterwards (the ending, e.g.
`unsupported`, is context, not cause).  One row per bucket.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

from stepfuzz.oracle.guest import END, GUEST_EXCEPTION, LEFT_CODE, MAX_STEPS, NO_SYNDROME, UNSUPPORTED_INSN
from stepfuzz.oracle.kvm.vmm import STUCK

from stepfuzz.fuzz.findings.store import crash_records

# how a run ended: context in a cause, never a trigger
ENDINGS = {END, MAX_STEPS, GUEST_EXCEPTION, UNSUPPORTED_INSN, NO_SYNDROME, LEFT_CODE, STUCK}
COLUMNS = ["effect", "trigger", "eras", "signatures", "hits", "first seen", "last seen", "smallest reproducer"]
EFFECT = {"zero-step": "0 instructions per stop", "multi-step": "2+ instructions per stop",
          "missing-stop": "2+ instructions per stop", "skipped-instruction": "an instruction skipped",
          "extra-stop": "an extra stop", "pc-mismatch": "a stop at the wrong PC",
          "outcome-mismatch": "a different run ending", "state-mismatch": "a different final state"}


@dataclass
class Bucket:
    effect: str
    trigger: str
    members: list[dict] = field(default_factory=list)
    real: dict[str, str] = field(default_factory=dict)     # kernel -> what it showed

    @property
    def eras(self) -> list[str]:
        from stepfuzz.oracle.kvm.eras import ERA_IDS
        present = {m["era"] for m in self.members}
        return [e for e in ERA_IDS if e in present]

    @property
    def count(self) -> int:
        return sum(m.get("count", 1) for m in self.members)

    @property
    def smallest(self) -> dict:
        def key(m):
            return (m.get("min_insns", m.get("case_insns", 1 << 30)), m["era"])
        return min(self.members, key=key)

    def cells(self, reproducer: str, show_real: bool) -> list[str]:
        """One report row, the reproducer cell as given."""
        out = [self.effect, self.trigger, ", ".join(self.eras), str(len(self.members)), str(self.count),
               min(m.get("first_seen", "") for m in self.members), max(m.get("last_seen", "") for m in self.members),
               reproducer]
        if show_real:
            out.append(", ".join(f"{k}: {v}" for k, v in sorted(self.real.items())) or "-")
        return out

    @property
    def smallest_insns(self) -> int | str:
        small = self.smallest
        return small.get("min_insns", small.get("case_insns", "?"))


def root_cause(info: dict) -> tuple[str, str]:
    tokens = [t for t in info.get("cause", "").split("+") if t and t not in ENDINGS]
    return EFFECT.get(info["kind"], info["kind"]), "+".join(tokens) or "plain"


def collect(crashes: Path) -> list[Bucket]:
    buckets: dict[tuple[str, str], Bucket] = {}
    for d, info in crash_records(crashes):
        info["dir"] = str(d)
        minimized = d / "minimized.json"
        info["reproducer"] = str(minimized if minimized.exists() else d / "case.json")
        if minimized.exists():
            from stepfuzz.oracle.case import load_case
            info["min_insns"] = len(load_case(minimized).words)
        key = root_cause(info)
        buckets.setdefault(key, Bucket(*key)).members.append(info)
    return sorted(buckets.values(), key=lambda b: (b.effect, b.trigger))


def markdown(buckets: list[Bucket], title: str) -> str:
    show_real = any(b.real for b in buckets)
    cols = COLUMNS + ["real kernels"] * show_real
    lines = [f"# {title}", "", f"{len(buckets)} root causes, {sum(len(b.members) for b in buckets)} signatures.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for b in buckets:
        small = b.smallest
        repro = (f"`{small['reproducer']}` ({b.smallest_insns} insns, "
                 f"`stepfuzz run {small['reproducer']} --era {small['era']}`)")
        lines.append("| " + " | ".join(b.cells(repro, show_real)) + " |")
    lines += ["", "## Signatures", ""]
    for b in buckets:
        for m in sorted(b.members, key=lambda m: m["signature"]):
            lines.append(f"- `{m['signature']}` x{m.get('count', 1)}: {m['title']} ({m['dir']})")
    return "\n".join(lines) + "\n"


def to_html(buckets: list[Bucket], title: str) -> str:
    show_real = any(b.real for b in buckets)
    cols = COLUMNS + ["real kernels"] * show_real
    rows = []
    for b in buckets:
        cells = b.cells(f"{b.smallest['reproducer']} ({b.smallest_insns} insns)", show_real)
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>td,th{border:1px solid #ccc;padding:4px;font:13px sans-serif}table{border-collapse:collapse}</style>"
            f"<h1>{html.escape(title)}</h1><table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols)
            + "</tr>" + "".join(rows) + "</table>\n")
