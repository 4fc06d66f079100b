"""The VMM: KVM_RUN in a loop, single-stepping, honouring the exit schedule.

This is what QEMU's gdbstub or a KVM selftest does; `model_trace` turns the
stops it sees into a Trace.
"""
from __future__ import annotations

from ..guest import END, MAX_STEPS, ExecLog
from ..trace import Exit, Stop, Trace
from .eras import Era
from .hardware import GuestHw
from .kernel import EINTR, ENOSYS, EXIT_DEBUG, EXIT_MMIO, GUEST_ENDED, Kvm

STUCK = "stuck"           # the model made no progress for too long (never expected)


def model_trace(era: Era, log: ExecLog) -> Trace:
    case = log.case
    hw = GuestHw(log)
    kvm = Kvm(era, hw)
    kvm.signal_on_trap = {e.at - 1 for e in case.events if e.when == "trap"}
    after_mmio: dict[int, list[str]] = {}
    after_stop: dict[int, list[str]] = {}
    for e in case.events:
        if e.when == "mmio-exit":
            after_mmio.setdefault(e.at, []).append(e.what)
        elif e.when == "stop":
            after_stop.setdefault(e.at, []).append(e.what)

    stops: list[Stop] = []
    exits: list[Exit] = []
    skipped: list[tuple[int, int]] = []    # (index of the stop that shows it, pc)
    last_retired = 0
    n_mmio = 0
    next_run: list[str] = []
    budget = 8 * case.max_steps + 64
    outcome, detail = STUCK, "no progress"
    for _ in range(budget):
        actions, next_run = next_run, []
        if "signal" in actions:
            kvm.signal = True
        for action in actions:
            hw.why.append(action)
        ret = kvm.ioctl_run(immediate_exit="immediate-exit" in actions, preempt="preempt" in actions)
        while len(skipped) < len(hw.skipped):
            skipped.append((len(stops), hw.skipped[len(skipped)]))
        if ret == EXIT_DEBUG:
            stops.append(Stop(hw.pc, hw.retired - last_retired, kvm.hsr, tuple(exits), tuple(hw.why)))
            last_retired = hw.retired
            exits, hw.why = [], []
            next_run = after_stop.get(len(stops), [])
            if hw.pc == case.end:
                outcome, detail = END, ""
                break
            if hw.retired >= case.max_steps:
                outcome, detail = MAX_STEPS, ""
                break
        elif ret == EXIT_MMIO:
            n_mmio += 1
            a = kvm.mmio_access
            exits.append(Exit("mmio", f"{'write' if a.write else 'read'} {a.size} bytes at {a.addr:#x}: {a.value:#x}"))
            next_run = after_mmio.get(n_mmio, [])
        elif ret == EINTR:
            exits.append(Exit("eintr"))
        elif ret == ENOSYS:
            exits.append(Exit("error", "KVM_RUN: ENOSYS"))
            outcome, detail = "no-syndrome", kvm.ending
            break
        else:
            assert ret == GUEST_ENDED, ret
            outcome, detail = kvm.ending, hw.log.detail
            break
    trace = Trace(stops, outcome, detail, tuple(exits), tuple(hw.why), skipped)
    if hw.log is not log:
        trace.final_regs = hw.log.final_regs()
    return trace
