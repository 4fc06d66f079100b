"""Readable and machine-readable renderings of oracle results."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from stepfuzz.oracle.asm import disasm
from stepfuzz.oracle.case import Case
from stepfuzz.oracle.trace import Exit, Stop, Trace, interrupt_vector
from stepfuzz.oracle.vocabulary import Ec, Outcome

if TYPE_CHECKING:
    from stepfuzz.oracle.realkvm.batch import RealTrace
    from stepfuzz.oracle.realkvm.kernels import Kernel
    from stepfuzz.oracle.realkvm.vm import RunStats
    from stepfuzz.oracle.run import Result

ROW_LIMIT = 60          # longer traces are shown around the divergence


def result_json(r: Result, source: str) -> dict[str, Any]:
    """One line of `stepfuzz run --json` (docs/case-format.md)."""
    return {
        "case": source,
        "era": r.era.id,
        "reference": ([{"pc": pc, "steps": 1} for pc in r.reference.pcs] if r.reference.full is None else
                      [_ref_stop_json(r.case, s) for s in r.reference.full]),
        "interrupt_vector_stops": interrupt_vector_stops(r),
        "reference_end": r.reference.outcome,
        "model": [stop_json(s) for s in r.model.stops],
        "model_end": r.model.outcome,
        **({"not_reproducible": r.model.detail} if r.model.outcome == Outcome.NOT_REPRODUCIBLE else {}),
        "divergence": r.divergence.to_json() if r.divergence else None,
    }


def interrupt_vector_stops(r: Result) -> int:
    """How many of the reference's stops land on an interrupt vector with
    nothing retired (trace.interrupt_vector)."""
    if r.reference.full is None:
        return 0
    return sum(1 for s in r.reference.full if interrupt_vector(r.case, s))


def _ref_stop_json(case: Case, s: Stop) -> dict[str, Any]:
    out: dict[str, Any] = {"pc": s.pc, "steps": s.steps, "ec": s.ec}
    vector = interrupt_vector(case, s)
    if vector:
        out["interrupt_vector"] = vector
    return out


def stop_json(s: Stop) -> dict[str, Any]:
    out: dict[str, Any] = {"pc": s.pc, "steps": s.steps, "isv": s.isv, "ec": s.ec, "hsr": s.hsr}
    if s.exits:
        out["exits"] = [f"{e.kind} {e.detail}".strip() for e in s.exits]
    return out


def exits_text(exits: Iterable[Exit]) -> str:
    return ", ".join(f"{e.kind} {e.detail}".strip() for e in exits)


def insn_at(case: Case, pc: int) -> str:
    """The instruction at `pc` of the case's code, disassembled."""
    word = case.code_word(pc)
    if word is not None:
        return disasm(word, pc)
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
    if r.model.outcome == Outcome.NOT_REPRODUCIBLE:
        return head + f"not reproducible: {r.model.detail}"
    head += f"DIVERGES  {d.title}  [{d.signature}]" if d else "agrees"
    landed = interrupt_vector_stops(r)
    if landed:
        head += (f"; {landed} step(s) land on an interrupt vector with nothing retired "
                 "(architectural, not what a debugger wants)")
    ref, model = r.reference.stops, r.model.stops
    rows = max(len(ref), len(model))
    lines = [head, f"  {'stop':>4}  {'instruction completed (reference)':<38} {'reference':<16} {'model':<16} isv  exits in between"]
    prev = -1
    log_pcs = r.log.pcs
    for i in shown_rows(rows, d.stop if d else 0, show_all):
        if i != prev + 1:
            lines.append(f"  {'...':>4}")
        prev = i
        insn = (f"{log_pcs[i]:#x} {insn_at(r.case, log_pcs[i])}" if i < len(ref) and r.reference.full is None
                else "")
        rcol = f"{ref[i].pc:#x} x{ref[i].steps}{_kind(ref[i])}" if i < len(ref) else "-"
        if i < len(model):
            s = model[i]
            mcol, isv = f"{s.pc:#x} x{s.steps}{_kind(s)}", str(s.isv)
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


def _kind(s: Stop) -> str:
    return "" if s.ec == Ec.SOFTSTEP else f" {s.ec}"


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


# ---------------------------------------------------------------- real kernels

def kernel_text(kernel: "Kernel | None") -> str:
    """A kernel as people name it: release name, upstream version, uname."""
    import platform
    if kernel is None:
        return f"host (Linux {platform.release()})"
    version = f"Linux {kernel.version}" if kernel.version else "version unknown"
    return f"{kernel.name} ({version}{', ' + kernel.release if kernel.release else ''})"


def run_stats_text(stats: "RunStats", n: int) -> str:
    boot = f"booted in {stats.boot_seconds:.1f} s, " if stats.boot_seconds is not None else ""
    rate = f", {60 * stats.sent / stats.seconds:.0f} cases/min" if stats.seconds and stats.sent else ""
    return f"{boot}{stats.sent} of {n} case(s) sent, {stats.seconds:.1f} s in all{rate}" + \
        (f"; the run stopped early: {stats.problem}" if stats.problem else "")


def exits_json(numbered) -> list[dict[str, Any]]:
    return [{"after_stop": i, "kind": e.kind, "detail": e.detail} for i, e in numbered]


def real_trace_json(t: RealTrace, kernel: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "case": t.source, "kernel": kernel,
        "stops": [{"pc": s.pc, "steps": s.steps, "isv": s.isv, "hsr": s.hsr} for s in t.stops],
        "exits": exits_json(t.exits),
        "end": t.end, "steps_inferred": True,      # a real kernel does not report steps
    }
    if t.detail:
        out["detail"] = t.detail
    if t.notes:
        out["notes"] = t.notes
    if t.console:
        out["console"] = t.console
    return out


def _inferred_steps(s: Stop) -> str:
    return "?" if s.steps < 0 else f"~{s.steps}"


def real_trace_table(t: RealTrace, case, where: str, show_all: bool = False) -> str:
    head = f"{t.source}  {where}: {t.end}" + (f" ({t.detail})" if t.detail else "")
    if not t.sent:
        return head
    if t.failed and not t.stops:
        return head + ("\n  console (last lines):\n    " + t.console.replace("\n", "\n    ") if t.console else "")
    lines = [head, f"  {'stop':>4}  {'stepped from':<38} {'pc':<12} {'steps':>5}  isv  exits in between"]
    prev_pc, last = case.base, -1
    for i in shown_rows(len(t.stops), 0, show_all):
        if i != last + 1:
            lines.append(f"  {'...':>4}")
        last = i
        s = t.stops[i]
        prev_pc = t.stops[i - 1].pc if i else case.base
        lines.append(f"  {i + 1:>4}  {f'{prev_pc:#x} {insn_at(case, prev_pc)}':<38} {s.pc:<#10x} {_inferred_steps(s):>5}  "
                     f"{s.isv:>3}  {exits_text(s.exits)}")
    if t.tail:
        lines.append("  after the last stop: " + exits_text(t.tail))
    for note in t.notes:
        lines.append(f"  note: {note}")
    lines.append("  (steps are inferred from the reference path: a real kernel does not report them)")
    if t.console:
        lines.append("  console (last lines):\n    " + t.console.replace("\n", "\n    "))
    return "\n".join(lines)


TAIL_EXITS = 8          # exits after the last stop a table shows (a guest that runs free makes thousands)


def _more(exits: tuple) -> str:
    return f", ... {len(exits) - TAIL_EXITS} more" if len(exits) > TAIL_EXITS else ""


def model_vs_real_table(case, path: str, model: Trace, real: RealTrace, d, kernel: str, era: str) -> str:
    head = f"MODEL-ONLY ({d.tcg_limit})" if d.tcg_limit else "DIFFERS"
    lines = [f"{path}  {head} on {kernel} vs era {era} at stop {d.stop + 1}: {d.what}",
             f"  {'stop':>4}  {'model pc':<12} {'isv':>3}   {'real pc':<12} {'isv':>3}  exits before the stop"]
    n = max(len(model.stops), len(real.stops))
    last = -1
    for i in shown_rows(n, d.stop, False):
        if i != last + 1:
            lines.append(f"  {'...':>4}")
        last = i
        m = model.stops[i] if i < len(model.stops) else None
        r = real.stops[i] if i < len(real.stops) else None
        mcol = f"{m.pc:<#12x} {m.isv:>3}" if m else f"{'-':<12} {'':>3}"
        rcol = f"{r.pc:<#12x} {r.isv:>3}" if r else f"{'-':<12} {'':>3}"
        mark = "  <<" if i == d.stop else ""
        lines.append(f"  {i + 1:>4}  {mcol}   {rcol}{mark}")
        mex, rex = exits_text(m.exits) if m else "", exits_text(r.exits) if r else ""
        if mex or rex:
            lines.append(f"  {'':>4}    model: {mex or '-'}")
            lines.append(f"  {'':>4}    real:  {rex or '-'}")
    lines.append(f"  end: model {model.outcome}" + (f" ({model.detail})" if model.detail else "")
                 + f", real {real.end}" + (f" ({real.detail})" if real.detail else ""))
    if model.tail or real.tail:
        lines.append(f"  after the last stop: model [{exits_text(model.tail[:TAIL_EXITS])}"
                     f"{_more(model.tail)}], real [{exits_text(real.tail[:TAIL_EXITS])}{_more(real.tail)}]")
    return "\n".join(lines)
