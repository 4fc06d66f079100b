"""Readable and machine-readable renderings of oracle results."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from stepfuzz.oracle.asm import disasm
from stepfuzz.oracle.case import Case
from stepfuzz.oracle.trace import Exit, Stop

if TYPE_CHECKING:
    from stepfuzz.oracle.run import Result

ROW_LIMIT = 60          # longer traces are shown around the divergence


def result_json(r: Result, source: str) -> dict[str, Any]:
    """One line of `stepfuzz run --json` (docs/case-format.md)."""
    return {
        "case": source,
        "era": r.era.id,
        "reference": [{"pc": pc, "steps": 1} for pc in r.reference.pcs],
        "reference_end": r.reference.outcome,
        "model": [stop_json(s) for s in r.model.stops],
        "model_end": r.model.outcome,
        "divergence": r.divergence.to_json() if r.divergence else None,
    }


def stop_json(s: Stop) -> dict[str, Any]:
    out: dict[str, Any] = {"pc": s.pc, "steps": s.steps, "isv": s.isv, "hsr": s.hsr}
    if s.exits:
        out["exits"] = [f"{e.kind} {e.detail}".strip() for e in s.exits]
    return out


def exits_text(exits: Iterable[Exit]) -> str:
    return ", ".join(f"{e.kind} {e.detail}".strip() for e in exits)


def insn_at(case: Case, pc: int) -> str:
    """The instruction at `pc` of the case's code, disassembled."""
    if case.base <= pc < case.end:
        return disasm(case.words[(pc - case.base) >> 2], pc)
    return "b ." if pc == case.end else "?"


def shown_rows(n: int, focus: int, show_all: bool = False) -> list[int]:
    """Which of n table rows to show: all of a short table, else the start,
    around `focus` and the end."""
    if n <= ROW_LIMIT or show_all:
        return list(range(n))
    return sorted(set(range(5)) | set(range(max(0, focus - 8), min(n, focus + 8))) | set(range(n - 3, n)))


def result_table(r: Result, source: str, show_all: bool = False) -> str:
    """A side-by-side table: the reference's stops next to the model's."""
    d = r.divergence
    head = f"{source}  era {r.era.id} ({r.era.kernels}): "
    head += f"DIVERGES  {d.title}  [{d.signature}]" if d else "agrees"
    ref, model = r.reference.pcs, r.model.stops
    rows = max(len(ref), len(model))
    lines = [head, f"  {'stop':>4}  {'instruction completed (reference)':<38} {'reference':<16} {'model':<16} isv  exits in between"]
    prev = -1
    log_pcs = r.log.pcs
    for i in shown_rows(rows, d.stop if d else 0, show_all):
        if i != prev + 1:
            lines.append(f"  {'...':>4}")
        prev = i
        insn = f"{log_pcs[i]:#x} {insn_at(r.case, log_pcs[i])}" if i < len(ref) else ""
        rcol = f"{ref[i]:#x} x1" if i < len(ref) else "-"
        if i < len(model):
            s = model[i]
            mcol, isv = f"{s.pc:#x} x{s.steps}", str(s.isv)
            exits = exits_text(s.exits)
        else:
            mcol, isv, exits = "-", " ", ""
        mark = "  << " + d.kind if d and i == d.stop else ""
        lines.append(f"  {i + 1:>4}  {insn:<38} {rcol:<16} {mcol:<16} {isv:>3}  {exits}{mark}")
    lines.append(f"  end: reference {r.reference.outcome}, model {r.model.outcome}"
                 + (f" ({r.model.detail})" if r.model.detail and r.model.outcome != r.reference.outcome else ""))
    if r.model.tail:
        lines.append("  after the last stop: " + exits_text(r.model.tail))
    if d and d.detail:
        lines.append(f"  {d.detail}")
    return "\n".join(lines)


def readable(case: Case) -> Case:
    """The case with its code as assembly text, when that text assembles back
    to exactly the same words (capstone and keystone agree); else unchanged."""
    from dataclasses import replace

    from stepfuzz.oracle.asm import AsmError, assemble
    text = "\n".join(disasm(w, case.base + 4 * i) for i, w in enumerate(case.words))
    try:
        if tuple(assemble(text, case.base)) == case.words:
            return replace(case, asm=text)
    except AsmError:
        pass
    return replace(case, asm=None)
