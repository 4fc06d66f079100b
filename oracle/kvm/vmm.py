"""The VMM: KVM_RUN in a loop, single-stepping, honouring the exit schedule.

This is what QEMU's gdbstub or a KVM selftest does; `model_trace` turns the
stops it sees into a Trace.
"""
from __future__ import annotations

from ..guest import END, MAX_STEPS, ExecLog
from ..isa import decode
from ..trace import DONE_NATIVE, HSR_STEPPED, Exit, Stop, Trace
from .eras import Era
from .hardware import GuestHw
from .kernel import EINTR, ENOSYS, EXIT_DEBUG, EXIT_MMIO, GUEST_ENDED, Kvm

STUCK = "stuck"           # the model made no progress for too long (never expected)
PLAIN_WHY = (DONE_NATIVE,)

# Model states (per era) from which one plain instruction -- no trap, no
# event -- gives one ordinary stop and leaves the state exactly as it was.
# Learned by running the full loop, then used to apply runs of plain
# instructions in bulk.  Nothing here is assumed about any era.
_STEADY: set[tuple] = set()
FAST_FORWARD = True         # tests switch it off to check it changes nothing


def _state(kvm: Kvm, hw: GuestHw) -> tuple:
    return (kvm.era.id, hw.ss, hw.irq_armed, hw.completed, hw.attempts, kvm.exit_reason, kvm.mmio_needed,
            kvm.increment_pc, kvm.ss_active_pending, kvm.host_ss_active_pending, kvm.signal)


def _ordinary(log: ExecLog) -> list[bool]:
    """Per dynamic instruction: completes natively with nothing to report."""
    case = log.case
    odd = {case.base + 4 * i for i, w in enumerate(case.words) if decode(w).load_exclusive}
    specials = log.specials
    return [i not in specials and pc not in odd for i, pc in enumerate(log.pcs[:log.n])]


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
    timed = hw.irq_before | hw.irq_after | kvm.signal_on_trap
    ordinary = _ordinary(log)
    for _ in range(budget):
        if FAST_FORWARD and not next_run and not exits and not hw.why and hw.log is log:
            n = _fast_forward(kvm, hw, ordinary, timed, stops, after_stop, case)
            if n:
                last_retired = hw.retired
                continue
        before = _state(kvm, hw) if not next_run else None
        idx = hw.idx
        actions, next_run = next_run, []
        if "signal" in actions:
            kvm.signal = True
        for action in actions:
            hw.why.append(action)
        ret = kvm.ioctl_run(immediate_exit="immediate-exit" in actions, preempt="preempt" in actions)
        while len(skipped) < len(hw.skipped):
            skipped.append((len(stops), hw.skipped[len(skipped)]))
        if ret == EXIT_DEBUG:
            stop = Stop(hw.pc, hw.retired - last_retired, kvm.hsr, tuple(exits), tuple(hw.why))
            stops.append(stop)
            if (before is not None and stop.hsr == HSR_STEPPED and stop.why == PLAIN_WHY and not stop.exits
                    and hw.log is log and idx < len(ordinary) and ordinary[idx] and idx not in timed
                    and _state(kvm, hw) == before):
                _STEADY.add(before)
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


def _fast_forward(kvm: Kvm, hw: GuestHw, ordinary: list[bool], timed: set[int], stops: list[Stop],
                  after_stop: dict[int, list[str]], case) -> int:
    """Apply a run of ordinary instructions from a steady state; returns how many."""
    if _state(kvm, hw) not in _STEADY:
        return 0
    start = i = hw.idx
    pcs, end = hw.log.pcs, case.end
    # leave the last instruction of the run, and anything near an end
    # condition or a scheduled event, to the full loop
    limit = min(len(ordinary) - 1, start + case.max_steps - hw.retired - 1)
    while (i < limit and ordinary[i] and i not in timed and pcs[i + 1] != end
           and not after_stop.get(len(stops) + (i - start) + 1)):
        i += 1
    if i == start:
        return 0
    stops.extend(Stop(pc, 1, HSR_STEPPED, (), PLAIN_WHY) for pc in pcs[start + 1:i + 1])
    hw.idx, hw.pc = i, pcs[i]
    hw.retired += i - start
    return i - start
