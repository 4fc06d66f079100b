"""The runner's protocol, host side: which cases can go to a real kernel,
the batch file that carries them, the console lines that come back, and
the real trace they make.  Also: comparing a real trace with a model's.

Batch and result formats are described in runner.c and docs/real-kvm.md.
"""
from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..case import DAIF_RESET, VECTOR_SLOTS, Case, Event
from ..guest import ExecLog
from ..kvm.eras import Era
from ..reference import reference
from ..run import not_reproducible
from ..conversation import NOT_MODELLED
from ..trace import Exit, Stop, Trace, mmio_exit, numbered_exits
from ..vocabulary import TCG_ORDERS, ExitKind, Meets, Outcome

CASE_TIMEOUT_BASE_MS = 5000     # per case: setup, prefault and slack under nested TCG
CASE_TIMEOUT_PER_STEP_MS = 4    # plus this per allowed step
REG_INDEX = {f"x{i}": i for i in range(31)} | {"sp": 31, "pc": 32, "daif": 33}
WHEN_WORD = {"start": "start", "mmio-exit": "mmio", "stop": "stop", "hypercall-exit": "hypercall", "eintr": "eintr"}
KVM_EXITS = {0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 5: "HLT", 8: "SHUTDOWN",
             9: "FAIL_ENTRY", 17: "INTERNAL_ERROR", 24: "SYSTEM_EVENT", 28: "ARM_NISV"}

# Endings of a real trace that are not results of the kernel under test.
NOT_REPRODUCIBLE, NOT_COMPARABLE, UNSUPPORTED_BY_RUNNER = "not-reproducible", "not-comparable", "unsupported-by-runner"
# Errors of the machinery (boot, runner, console, host), as opposed to KVM_RUN's own errors.
INFRA_ERRORS = ("error:setup", "error:runner", "error:vm", "error:boot", "error:kernel-panic",
                "error:garbled", "error:host")

# Events the runner cannot apply deterministically, and why.
WHY_NOT = {
    "before": "a host interrupt before instruction {at} cannot be injected at an exact guest instruction",
    "after": "a host interrupt after instruction {at} retires needs the CPU to take it before the step "
             "exception; QEMU (TCG) always takes the step exception first",
    "trap": "a signal arriving while the kernel handles the exit of instruction {at} cannot be timed "
            "from userspace",
}


def case_timeout_ms(case: Case) -> int:
    return CASE_TIMEOUT_BASE_MS + CASE_TIMEOUT_PER_STEP_MS * case.max_steps


# ---------------------------------------------------------------- real traces

@dataclass
class RealTrace:
    """What a real kernel showed for one case (or why it was not run)."""
    source: str
    stops: list[Stop] = field(default_factory=list)    # steps inferred (see infer_steps)
    tail: tuple[Exit, ...] = ()                        # exits after the last stop
    end: str = ""              # end | left-code | max-steps | error:<ERRNO> | timeout | not-reproducible | ...
    detail: str = ""
    notes: list[str] = field(default_factory=list)
    console: str = ""          # the console's last lines, when the run failed

    @property
    def sent(self) -> bool:
        return not self.end.startswith((NOT_REPRODUCIBLE, NOT_COMPARABLE))

    @property
    def compared(self) -> bool:
        """The kernel ran the case (its trace can be compared with a model's)."""
        return self.sent and not self.end.startswith(UNSUPPORTED_BY_RUNNER)

    @property
    def failed(self) -> bool:
        """The run did not produce a kernel result (boot, runner or host trouble)."""
        return self.end == "timeout" or self.end.startswith(INFRA_ERRORS)

    @property
    def exits(self) -> list[tuple[int, Exit]]:
        """Every non-stop exit with the number of stops before it."""
        return numbered_exits(self.stops, self.tail)


def _header_limit(name: str) -> int:
    """A limit of the runner's VMM, read from the header it is built with
    (one definition for C and Python)."""
    text = (Path(__file__).with_name("stepfuzz_vmm.h")).read_text()
    return int(re.search(rf"#define {name} (\d+)", text)[1])


MAX_REGIONS, MAX_EVENTS = _header_limit("MAX_REGIONS"), _header_limit("MAX_EVENTS")
# The runner's vGIC redistributor (a case with an mmio-kernel region gets one):
# an in-kernel device no case declares, so a guest that reaches it is not comparable.
REDIST_BASE, REDIST_SIZE = _header_limit("VGIC_REDIST_BASE"), 0x20000


def touches_redistributor(case: Case, log: ExecLog) -> bool:
    if not any(r.kind == "mmio-kernel" for r in case.memory):
        return False
    return any(s.access is not None and REDIST_BASE <= s.access.addr < REDIST_BASE + REDIST_SIZE
               for s in log.specials.values())


def runner_limit(case: Case) -> str:
    """Why the runner's VMM cannot set `case` up ('' if it can)."""
    if len(case.memory) > MAX_REGIONS:
        return f"{len(case.memory)} memory regions (the runner takes at most {MAX_REGIONS})"
    if len(case.events) > MAX_EVENTS:
        return f"{len(case.events)} events (the runner takes at most {MAX_EVENTS})"
    return ""


def skip_reason(case: Case, log: ExecLog, era: Era | None = None) -> RealTrace | None:
    """A trace that says why `case` is not sent to a real kernel (of `era`), or None."""
    if runner_limit(case):
        return RealTrace(case.source, end=f"{NOT_REPRODUCIBLE}:runner-limit",
                         detail="not reproducible here: " + runner_limit(case))
    missing = not_reproducible(case, era) if era is not None else ""
    if missing:
        return RealTrace(case.source, end=f"{NOT_REPRODUCIBLE}:feature", detail="not reproducible here: " + missing)
    ref = reference(log)
    if ref.outcome == Outcome.MAX_STEPS and not ref.stepping_at_end:
        return RealTrace(case.source, end=f"{NOT_COMPARABLE}:runs-free",
                         detail="the guest runs past max_steps with nothing stepping: on a real kernel only a "
                                "wall clock would stop it")
    if ref.outcome == Outcome.LEFT_CODE and not ref.stepping_at_end:
        # the runner sees where the guest is only at a stop
        return RealTrace(case.source, end=f"{NOT_COMPARABLE}:runs-free",
                         detail="the guest leaves its code with nothing stepping: a real kernel runs on wherever "
                                "it went, and no stop shows where")
    if ref.outcome == Outcome.END and not ref.stepping_at_end and ref.irq_at_end:
        # the interrupt comes before the VMM's breakpoint at the end (as it does before any breakpoint)
        return RealTrace(case.source, end=f"{NOT_COMPARABLE}:runs-free",
                         detail=f"the guest takes an {ref.irq_at_end} at the end of its code with nothing stepping: "
                                "the breakpoint there never fires and it runs on in the handler")
    if ref.outcome in (Outcome.UNSUPPORTED, Outcome.GUEST_EXCEPTION):
        return RealTrace(case.source, end=f"{NOT_COMPARABLE}:{ref.outcome}", detail=ref.detail)
    if touches_redistributor(case, log):
        return RealTrace(case.source, end=f"{NOT_COMPARABLE}:redistributor",
                         detail=f"the guest reaches {REDIST_BASE:#x}, where the runner puts the vGIC redistributor")
    if log.outcome in (Outcome.UNSUPPORTED, Outcome.GUEST_EXCEPTION):
        return RealTrace(case.source, end=f"{NOT_COMPARABLE}:{log.outcome}", detail=log.detail)
    # what the case asks of the VMM that neither the models nor the runner do yet
    not_done = sorted({e.what for e in case.events if e.what in NOT_MODELLED}
                      | {e.when for e in case.events if e.when == "system-event"}
                      | ({f"nisv {case.nisv}"} if case.nisv != "end" else set()))
    if not_done:
        return RealTrace(case.source, end=f"{NOT_COMPARABLE}:{Outcome.UNSUPPORTED}",
                         detail="not modelled yet: " + ", ".join(not_done))
    for e in case.events:
        if e.when in WHY_NOT:
            return RealTrace(case.source, end=f"{NOT_REPRODUCIBLE}:{e.when}-{e.what}",
                             detail="not reproducible here: " + WHY_NOT[e.when].format(at=e.at))
    return None


def needs_second_cpu(case: Case) -> bool:
    """Does the case migrate the vCPU thread (a `preempt`)?  The runner
    brings the guest's second CPU online for it (runner.c need_cpus_for)."""
    return any(e.what == "preempt" for e in case.events)


# ---------------------------------------------------------------- batch file

def encode(cases: list[tuple[int, Case]]) -> str:
    """The runner's input for `cases` ((id, case) pairs)."""
    out = ["stepfuzz-batch 1"]
    for cid, c in cases:
        out.append(f"case {cid} {c.base:#x} {c.max_steps} {case_timeout_ms(c)} {c.mmio_read:#x}")
        out += [f"reg {REG_INDEX[name]} {value:#x}" for name, value in c.regs]
        if c.daif() != DAIF_RESET:
            out.append(f"daif {c.daif():#x}")
        out += [f"el1-reg {name} {value:#x}" for name, value in c.el1_regs if name != "daif"]
        out += [f"smccc {first:#x} {count}" for first, count in c.smccc_forward]
        if c.hypercall_result:
            out.append(f"hypercall-result {c.hypercall_result:#x}")
        out += [f"region {r.kind} {r.base:#x} {r.size:#x} {int(r.prefault)}" for r in c.memory]
        if c.vectors is not None:
            out.append(f"vectors {c.vectors.base:#x}")
            for kind, words, _ in c.vectors.handlers:
                out.append(f"handler {VECTOR_SLOTS[kind]:#x} {len(words)}")
                out += _word_lines(words)
        out += [_event_line(e) for e in c.events if e.when in WHEN_WORD]
        out.append(f"words {len(c.words)}")
        out += _word_lines(c.words)
        out.append("go")
    out.append("end")
    return "\n".join(out) + "\n"


def _word_lines(words: tuple[int, ...]) -> list[str]:
    return [" ".join(f"{w:#x}" for w in words[i:i + 8]) for i in range(0, len(words), 8)]


def _event_line(e: Event) -> str:
    line = f"event {WHEN_WORD[e.when]} {e.at} {e.what}"
    if e.what == "set-reg":
        line += f" {REG_INDEX[e.reg]} {e.value:#x}"
    elif e.what == "debug":
        line += f" {e.control} {len(e.hw_bp)}" + "".join(f" {a:#x}" for a in e.hw_bp)
    elif e.what == "irq-line":
        line += f" {e.line} {e.level}"
    return line


# ---------------------------------------------------------------- console lines

# The runner's own lines start with the marker (a program run in exec mode
# has its lines relayed behind "| ", so it cannot forge one).
LINE = re.compile(r"^@@sf (\S.*)$")


# What a batch's `done` line times, in seconds: inside KVM_RUN, in whole
# cases, the whole batch, then each stage of a case (creating the VM and
# setting registers, the prefault prologue, stepping, tearing the VM down).
TIMING = ("kvm_run", "guest_cases", "guest_batch", "vm_setup", "prefault", "stepping", "vm_teardown")


class Parser:
    """Turns the runner's lines into RealTraces, as they arrive."""

    def __init__(self, sources: dict[int, str]):
        self.sources = sources
        self.traces: dict[int, RealTrace] = {}
        self.current: int | None = None     # the case that has begun and not ended
        self.ready = False
        self.done = False
        self.fatal = ""
        self.exec_status: str | None = None
        self._exits: list[Exit] = []
        self._records = 0
        self.timing: dict[str, float] = {}

    def start_batch(self, sources: dict[int, str]) -> None:
        """A new batch on the same runner: its cases' sources, no traces yet."""
        self.sources, self.traces, self.current, self.done, self.timing = sources, {}, None, False, {}

    def feed(self, raw: str) -> None:
        m = LINE.match(raw.rstrip("\r\n").lstrip("\r"))
        if not m:
            return
        words = m[1].split()
        head = words[0]
        if head == "ready":
            self.ready = True
        elif head == "done":
            self.done = True
            try:                # the guest's clock, in us (runner.c `done`)
                self.timing = {k: int(w) / 1e6 for k, w in zip(TIMING, words[1:], strict=True)}
            except ValueError:
                self.timing = {}
        elif head == "fatal":
            self.fatal = " ".join(words[1:])
        elif head == "exec-exit":
            self.exec_status = " ".join(words[1:])
        elif head.isdigit() and len(words) >= 2:
            self._case_line(int(head), words[1], words[2:])

    def _case_line(self, cid: int, kind: str, args: list[str]) -> None:
        if kind == "begin":
            self.current = cid
            self.traces[cid] = RealTrace(self.sources.get(cid, str(cid)))
            self._exits, self._records = [], 0
            return
        t = self.traces.get(cid)
        if t is None or cid != self.current:
            return
        try:
            if kind == "S":
                t.stops.append(Stop(int(args[0], 16), 0, int(args[1], 16), tuple(self._exits)))
                self._exits = []
                self._records += 1
            elif kind == "M":
                direction, addr, size, data = args[0], int(args[1], 16), int(args[2]), int(args[3], 16)
                self._exits.append(mmio_exit(direction == "w", size, addr, data))
                self._records += 1
            elif kind == "I":
                self._exits.append(Exit(ExitKind.EINTR))
                self._records += 1
            elif kind == "H":
                self._exits.append(Exit(ExitKind.HYPERCALL, args[0]))
                self._records += 1
            elif kind == "E":
                self._exits.append(Exit(ExitKind.ERROR, f"KVM_RUN: {_errno_name(int(args[0]))}"))
                self._records += 1
            elif kind == "note":
                t.notes.append(" ".join(args))
            elif kind == "end":
                self._end(t, args)
        except (IndexError, ValueError):
            self._records = -1 << 30          # a garbled line: the end count will not match

    def _end(self, t: RealTrace, args: list[str]) -> None:
        reason, count, detail = args[0], int(args[1]), " ".join(args[2:])
        t.tail = tuple(self._exits)
        self.current = None
        if count != self._records:
            t.end, t.detail = "error:garbled-output", f"the runner reported {count} records, {max(self._records, 0)} arrived intact"
            return
        if reason in ("end", "left-code", "max-steps", "timeout", "breakpoint"):
            t.end = reason
        elif reason == "error":
            t.end = f"error:{_errno_name(int(detail))}"
            detail = f"KVM_RUN failed with {_errno_name(int(detail))} ({os.strerror(int(detail))})"
        elif reason == "exit":
            t.end = f"error:exit-{KVM_EXITS.get(int(detail), detail)}"
            detail = f"KVM_RUN returned exit reason {detail}"
        elif reason == "max-runs":
            t.end, detail = "error:too-many-runs", "8 x max_steps + 64 KVM_RUN calls without an ending"
        elif reason == "unsupported":
            t.end = UNSUPPORTED_BY_RUNNER
        else:
            t.end = f"error:{reason}"
        t.detail = detail


def _errno_name(n: int) -> str:
    return errno.errorcode.get(n, str(n))


# ---------------------------------------------------------------- steps, inferred

def infer_steps(trace: RealTrace, log: ExecLog) -> None:
    """Fill in steps per stop by walking the reference path.

    A real kernel does not say how many instructions ran between two stops.
    Each stop's PC is looked up on the ideal path from the previous stop's
    position on; the steps are the positions advanced.  A stop with ISV=1
    stepped an instruction, so its search starts one further (this keeps a
    branch-to-self at 1 step).  A PC off the path gets -1 and leaves the
    position where it was.  An exception the guest took without retiring
    the instruction (a position of the path) is no step.
    """
    pcs = log.pcs
    taken = {i for i, s in log.specials.items() if s.kind == Meets.EXCEPTION}
    pos = 0
    stops = []
    for s in trace.stops:
        start = pos + 1 if s.isv else pos
        found = next((q for q in range(start, len(pcs)) if pcs[q] == s.pc), None)
        if found is None and start != pos and pos < len(pcs) and pcs[pos] == s.pc:
            found = pos
        if found is None:
            stops.append(s._replace(steps=-1))
        else:
            stops.append(s._replace(steps=found - pos - sum(1 for i in taken if pos <= i < found)))
            pos = found
    trace.stops = stops


# ---------------------------------------------------------------- model vs real

MODEL_END_AS_REAL = {Outcome.END: "end", Outcome.NO_SYNDROME: "error:ENOSYS", Outcome.LEFT_CODE: "left-code",
                     Outcome.MAX_STEPS: "max-steps", Outcome.BREAKPOINT: "breakpoint"}


@dataclass(frozen=True)
class Difference:
    stop: int                 # index of the first stop that differs (len(stops) for the ending)
    what: str
    tcg_limit: str = ""       # why QEMU's TCG cannot show what hardware does from that stop on ("" if it can)


def tcg_order(what: str) -> str:
    return (f"from here the model takes a due step before {what}; QEMU's TCG takes {what} first, "
            "so it cannot show what a CPU does")


def difference(model: Trace, real: RealTrace) -> Difference | None:
    """None when the real kernel showed what the model predicts, stop for
    stop.  A difference from a stop on which the model chose an order QEMU's
    TCG resolves otherwise is marked as such: model-only, not a kernel fact."""
    d = _first_difference(model, real)
    if d is None:
        return None
    for s in model.stops[:d.stop + 1]:
        race = next((w for w in s.why if w in TCG_ORDERS), None)
        if race is not None:
            return Difference(d.stop, d.what, tcg_order(TCG_ORDERS[race]))
    return d


def exit_key(e: Exit) -> tuple:
    """What must match in an exit: its kind, and for MMIO direction, size, address and value."""
    if e.kind != ExitKind.MMIO:
        return (e.kind, e.detail)
    m = re.match(r"(read|write) (\d+) bytes at (0x[0-9a-f]+): (0x[0-9a-f]+)", e.detail)
    if not m:
        return (e.kind, e.detail)
    size = int(m[2])
    return ("mmio", m[1], size, int(m[3], 16), int(m[4], 16) & ((1 << (8 * size)) - 1))


def exits_differ(model: tuple[Exit, ...], real: tuple[Exit, ...]) -> str:
    """'' when the exits match, else what differs first."""
    for m, r in zip(model, real):
        if exit_key(m) != exit_key(r):
            return f"exit '{m.kind} {m.detail}' (model) vs '{r.kind} {r.detail}' (real)"
    if len(model) != len(real):
        return f"{len(model)} exits (model) vs {len(real)} (real)"
    return ""


def _first_difference(model: Trace, real: RealTrace) -> Difference | None:
    mstops, rstops = model.stops, real.stops
    capped = model.outcome == Outcome.MAX_STEPS          # the model stopped counting: compare its stops only
    for i, (m, r) in enumerate(zip(mstops, rstops)):
        if m.pc != r.pc:
            return Difference(i, f"PC {m.pc:#x} (model) vs {r.pc:#x} (real)")
        if m.ec != r.ec:
            return Difference(i, f"a {m.ec} stop (model) vs a {r.ec} stop (real)")
        if m.isv != r.isv:
            return Difference(i, f"ISV {m.isv} (model) vs {r.isv} (real)")
        why = exits_differ(m.exits, r.exits)
        if why:
            return Difference(i, why + " before this stop")
    n = min(len(mstops), len(rstops))
    if len(rstops) < len(mstops):
        return Difference(n, f"{len(mstops)} stops (model) vs {len(rstops)} (real)")
    if capped:
        return None
    if len(rstops) > len(mstops):
        return Difference(n, f"{len(mstops)} stops (model) vs {len(rstops)} (real)")
    why = exits_differ(model.tail, real.tail)
    if why:
        return Difference(n, why + " after the last stop")
    want = MODEL_END_AS_REAL.get(model.outcome, model.outcome)
    if want != real.end:
        return Difference(n, f"ending {model.outcome} (model) vs {real.end} (real)")
    return None
