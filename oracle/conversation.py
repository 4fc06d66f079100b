"""The VMM's side of the conversation: KVM_RUN in a loop, honouring the case's schedule.

One loop for the reference and for every era model, so that both sides hold
exactly the same conversation with their kernel: the same actions at the same
counts of stops and exits, the same rules for when a run ends.  What differs
is only the kernel behind `ioctl_run` (kvm/kernel.py per era, or the ideal
kernel of reference.py).

A kernel offers `ioctl_run(immediate_exit, preempt)`, `set_one_reg`,
`set_guest_debug`, `set_irq_line`, a `signal` flag and the fields a VMM reads after an exit
(`exit_reason`, `hsr`, `mmio_access`, `hypercall`, `ending`); its `cpu` is
where the guest is (`pc`, `retired`, `why`, `skipped`, `log`).
"""
from __future__ import annotations

from collections import Counter
from typing import Protocol

from .case import INSN_EVENTS, Case, Event
from .guest import ExecLog
from .trace import Exit, RefTrace, Stop, Trace, ec_of, mmio_exit
from .vocabulary import Ec, ExitKind, Outcome, RunResult

_new_stop = tuple.__new__   # builds a Stop in C (NamedTuple's own __new__ is Python code)

# VMM actions only the exit schedule's flags carry into the next KVM_RUN
RUN_FLAGS = ("immediate-exit", "signal", "preempt")
NOT_MODELLED = ("serror", "vcpu-init")


class Cpu(Protocol):
    pc: int
    retired: int
    why: list[str]
    skipped: list[int]
    log: ExecLog


class Schedule:
    """The case's VMM events by what triggers them: (when, n) -> events."""

    def __init__(self, case: Case):
        self.after: dict[tuple[str, int], list[Event]] = {}
        for e in case.events:
            if e.when not in INSN_EVENTS:
                self.after.setdefault((e.when, e.at), []).append(e)
        self.stop_events = sorted(n for when, n in self.after if when == "stop")

    def at(self, when: str, n: int = 0) -> list[Event]:
        return self.after.get((when, n), [])


def debug_bps(case: Case, e: Event) -> frozenset[int]:
    """The hardware breakpoints a `debug` event asks for.  When the VMM lets
    the guest run without stepping it keeps one at the end of the code too,
    so the run still ends there (the code is followed by `b .`)."""
    return frozenset(e.hw_bp) | ({case.end} if e.control == "continue" else set())


def same_stop(stop: Stop, ref: RefTrace, i: int) -> bool:
    """Does stop i agree with the reference's stop i (PC, steps and kind)?"""
    return (i < len(ref.pcs) and stop.pc == ref.pcs[i] and stop.steps == ref.steps_at(i)
            and stop.ec == ref.ec_at(i))


class Shortcut(Protocol):
    """Applies runs of ordinary stops without the loop (kvm/vmm.py)."""
    def skip(self, stops: list[Stop], exits: list[Exit], pending: list[Event]) -> bool: ...
    def learn(self, stop: Stop) -> None: ...


def converse(kernel, cpu: Cpu, case: Case, schedule: Schedule, stop_at: RefTrace | None = None,
             shortcut: Shortcut | None = None) -> Trace:
    """Single-step `case` against `kernel`.  With `stop_at` (the reference)
    the run ends at the first stop that differs from it: all a signature
    needs.  A `shortcut` may apply runs of ordinary stops itself."""
    stops: list[Stop] = []
    exits: list[Exit] = []
    skipped: list[tuple[int, int]] = []    # (index of the stop that shows it, pc)
    counts: Counter[str] = Counter()
    last_retired = 0
    pending: list[Event] = list(schedule.at("start"))
    mmio_open = False                      # the last KVM_RUN returned KVM_EXIT_MMIO
    outcome, detail = Outcome.STUCK, "no progress"
    for _ in range(8 * case.max_steps + 64):
        if shortcut is not None and shortcut.skip(stops, exits, pending):
            last_retired = cpu.retired
            continue
        immediate = preempt = signal = False
        if pending:
            actions, pending = pending, []
            names = []
            for e in actions:
                if e.what in NOT_MODELLED:
                    outcome, detail = Outcome.UNSUPPORTED, f"the VMM action '{e.what}' is not modelled yet"
                    break
                names.append(e.what if e.what in RUN_FLAGS else f"{e.what}:{e.reg or e.control or e.line}")
                if e.what == "immediate-exit":
                    immediate = True
                elif e.what == "signal":
                    signal = True             # raised just before the KVM_RUN below, as the runner does
                elif e.what == "preempt":
                    preempt = True
                elif e.what == "debug":
                    kernel.set_guest_debug(e.control != "off", e.control == "step", debug_bps(case, e))
                elif e.what == "irq-line":
                    kernel.set_irq_line(e.line, e.level)
                else:                          # set-reg
                    if mmio_open:
                        # KVM completes an MMIO exit on the next KVM_RUN; a VMM
                        # that writes registers completes it first (an
                        # immediate exit), as the API asks and QEMU does.
                        mmio_open = False
                        kernel.ioctl_run(immediate_exit=True)
                        exits.append(Exit(ExitKind.EINTR))
                        counts["eintr"] += 1
                        pending += schedule.at("eintr", counts["eintr"])
                    kernel.set_one_reg(e.reg, e.value)
                    if e.reg == "pc" and e.value != case.end and case.code_word(e.value) is None:
                        # the guest would go on outside its code: the run is over,
                        # and the actions after this one are never taken
                        outcome, detail = Outcome.LEFT_CODE, f"the VMM wrote pc = {e.value:#x}, outside the code"
                        break
            else:
                cpu.why.extend(names)
            if outcome in (Outcome.UNSUPPORTED, Outcome.LEFT_CODE):
                break
        if signal:
            kernel.signal = True
        ret = kernel.ioctl_run(immediate_exit=immediate, preempt=preempt)
        mmio_open = False
        while len(skipped) < len(cpu.skipped):
            skipped.append((len(stops), cpu.skipped[len(skipped)]))
        if ret == RunResult.DEBUG:
            stop = _new_stop(Stop, (cpu.pc, cpu.retired - last_retired, kernel.hsr, tuple(exits), tuple(cpu.why)))
            stops.append(stop)
            if shortcut is not None:
                shortcut.learn(stop)
            if stop_at is not None and not same_stop(stop, stop_at, len(stops) - 1):
                outcome, detail = Outcome.DIVERGED, ""
                exits, cpu.why = [], []           # they belong to this stop, not to a tail
                break
            last_retired = cpu.retired
            exits, cpu.why = [], []
            pending += schedule.at("stop", len(stops))
            if cpu.pc == case.end:
                outcome, detail = Outcome.END, ""
                break
            if case.code_word(cpu.pc) is None:
                # a stop outside the code ends the run there, as a VMM sees it:
                # the actions meant for this stop are never taken
                outcome, detail = Outcome.LEFT_CODE, f"a stop at {cpu.pc:#x}, outside the code"
                break
            if cpu.retired >= case.max_steps or len(stops) >= case.max_steps:
                outcome, detail = Outcome.MAX_STEPS, ""
                break
            if stop.ec != Ec.SOFTSTEP and not pending:
                # a BRK or a breakpoint nobody answers would stop again, forever
                outcome, detail = Outcome.BREAKPOINT, f"{ec_of(stop.hsr)} at {stop.pc:#x}"
                break
        elif ret == RunResult.MMIO:
            counts["mmio-exit"] += 1
            mmio_open = True
            a = kernel.mmio_access
            exits.append(mmio_exit(a.write, a.size, a.addr, a.value))
            pending += schedule.at("mmio-exit", counts["mmio-exit"])
        elif ret == RunResult.HYPERCALL:
            # the VMM answers with x0 = hypercall_result (the log has it)
            counts["hypercall-exit"] += 1
            exits.append(Exit(ExitKind.HYPERCALL, kernel.hypercall))
            pending += schedule.at("hypercall-exit", counts["hypercall-exit"])
        elif ret == RunResult.EINTR:
            counts["eintr"] += 1
            exits.append(Exit(ExitKind.EINTR))
            pending += schedule.at("eintr", counts["eintr"])
        elif ret == RunResult.ENOSYS:
            exits.append(Exit(ExitKind.ERROR, "KVM_RUN: ENOSYS"))
            if case.nisv != "end":
                outcome, detail = Outcome.UNSUPPORTED, f"nisv '{case.nisv}' is not modelled yet"
            else:
                outcome, detail = Outcome.NO_SYNDROME, kernel.ending
            break
        else:
            assert ret == RunResult.GUEST_ENDED, ret
            outcome, detail = kernel.ending, kernel.detail
            break
    trace = Trace(stops, outcome, detail, tuple(exits), tuple(cpu.why), skipped, stepping_at_end=kernel.singlestep)
    if stop_at is not None:       # every stop was checked on arrival (fast-forwarded ones are ideal)
        trace.agreed = len(stops) - 1 if outcome == Outcome.DIVERGED else len(stops)
    return trace

