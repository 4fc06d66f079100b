"""The VMM: KVM_RUN in a loop, single-stepping, honouring the exit schedule.

This is what QEMU's gdbstub or a KVM selftest does; `model_trace` turns the
stops it sees into a Trace.
"""
from __future__ import annotations

import bisect
import itertools

from ..guest import ExecLog
from ..trace import HSR_STEPPED, Exit, Stop, Trace, mmio_exit
from ..vocabulary import Completion, ExitKind, Outcome, RunResult
from .eras import Era
from .hardware import GuestHw
from .kernel import Kvm

PLAIN_WHY = (Completion.NATIVE,)
_new_stop = tuple.__new__   # builds a Stop in C (NamedTuple's own __new__ is Python code)

# Model states (per era) from which one plain instruction -- no trap, no
# event -- gives one ordinary stop and leaves the state exactly as it was.
# Learned by running the full loop, then used to apply runs of plain
# instructions in bulk.  Nothing here is assumed about any era.
_STEADY: set[tuple] = set()
FAST_FORWARD = True         # tests switch it off to check it changes nothing


def _state(kvm: Kvm, hw: GuestHw) -> tuple:
    return (kvm.era.id, hw.ss, hw.irq_armed, hw.completed, hw.attempts, kvm.exit_reason, kvm.mmio_needed,
            kvm.increment_pc, kvm.ss_active_pending, kvm.host_ss_active_pending, kvm.signal)


class _Shared:
    """Per execution log, computed once and shared by every era: the case's
    exit schedule as the run loop consumes it, where runs of ordinary
    instructions (completing natively, nothing to report, no event) end, and
    the stop each of them gives."""

    def __init__(self, log: ExecLog):
        events = log.case.events
        self.irq_before = frozenset(e.at - 1 for e in events if e.when == "before")
        self.irq_after = frozenset(e.at - 1 for e in events if e.when == "after")
        self.signal_on_trap = frozenset(e.at - 1 for e in events if e.when == "trap")
        self.after_mmio: dict[int, list[str]] = {}
        self.after_stop: dict[int, list[str]] = {}
        for e in events:
            if e.when == "mmio-exit":
                self.after_mmio.setdefault(e.at, []).append(e.what)
            elif e.when == "stop":
                self.after_stop.setdefault(e.at, []).append(e.what)
        self.stop_events = sorted(self.after_stop)
        n, pcs = log.n, log.pcs
        # built in C (Stop's own __new__ is Python code, and this runs once per case)
        one = itertools.repeat
        self.ideal: list[Stop] = list(map(tuple.__new__, one(Stop),
                                          zip(pcs[1:n + 1], one(1), one(HSR_STEPPED), one(()), one(PLAIN_WHY))))
        # run_end[i]: the first index >= i that the full loop must handle
        odd, end = log.load_exclusive_pcs, log.case.end
        handled = set(log.specials) | self.irq_before | self.irq_after | self.signal_on_trap
        if odd:
            handled.update(i for i in range(n) if pcs[i] in odd)
        if n and pcs[n] == end:
            handled.add(n - 1)            # the guest stops at the end: only its last instruction reaches it
        self.run_end: list[int] = []
        for b in sorted(i for i in handled if i < n) + [n]:
            self.run_end += [b] * (b + 1 - len(self.run_end))


def _shared(log: ExecLog) -> _Shared:
    cached = getattr(log, "_shared", None)
    if cached is None:
        cached = log._shared = _Shared(log)
    return cached


def model_trace(era: Era, log: ExecLog, stop_at: list[int] | None = None) -> Trace:
    """The era's trace of the execution in `log`.  With `stop_at` (the
    reference's stop PCs) the run ends at the first stop that differs from
    them: all a signature needs, for a fraction of the cost."""
    case = log.case
    shared = _shared(log)
    hw = GuestHw(log, shared.irq_before, shared.irq_after)
    kvm = Kvm(era, hw)
    kvm.signal_on_trap = set(shared.signal_on_trap)
    after_mmio, after_stop = shared.after_mmio, shared.after_stop

    stops: list[Stop] = []
    exits: list[Exit] = []
    skipped: list[tuple[int, int]] = []    # (index of the stop that shows it, pc)
    last_retired = 0
    n_mmio = 0
    next_run: list[str] = []
    budget = 8 * case.max_steps + 64
    outcome, detail = Outcome.STUCK, "no progress"
    run_end = shared.run_end
    for _ in range(budget):
        idx = hw.idx
        # the next instruction is ordinary, and nothing is pending
        ordinary = idx < log.n and run_end[idx] > idx and not next_run and not exits and not hw.why \
            and hw.log is log
        before = _state(kvm, hw) if ordinary else None
        if before in _STEADY and FAST_FORWARD:
            n = _fast_forward(hw, shared, stops, case)
            if n:
                last_retired = hw.retired
                continue
        if next_run:
            actions, next_run = next_run, []
            if "signal" in actions:
                kvm.signal = True
            hw.why.extend(actions)
            ret = kvm.ioctl_run(immediate_exit="immediate-exit" in actions, preempt="preempt" in actions)
        else:
            ret = kvm.ioctl_run()
        while len(skipped) < len(hw.skipped):
            skipped.append((len(stops), hw.skipped[len(skipped)]))
        if ret == RunResult.DEBUG:
            stop = _new_stop(Stop, (hw.pc, hw.retired - last_retired, kvm.hsr, tuple(exits), tuple(hw.why)))
            stops.append(stop)
            if (before is not None and stop.hsr == HSR_STEPPED and stop.why == PLAIN_WHY and not stop.exits
                    and hw.log is log and _state(kvm, hw) == before):
                _STEADY.add(before)
            if stop_at is not None:
                i = len(stops) - 1
                if stop.steps != 1 or i >= len(stop_at) or stop.pc != stop_at[i]:
                    while len(skipped) < len(hw.skipped):
                        skipped.append((len(stops) - 1, hw.skipped[len(skipped)]))
                    outcome, detail = Outcome.DIVERGED, ""
                    exits, hw.why = [], []        # they belong to this stop, not to a tail
                    break
            last_retired = hw.retired
            exits, hw.why = [], []
            next_run = after_stop.get(len(stops), [])
            if hw.pc == case.end:
                outcome, detail = Outcome.END, ""
                break
            if hw.retired >= case.max_steps:
                outcome, detail = Outcome.MAX_STEPS, ""
                break
        elif ret == RunResult.MMIO:
            n_mmio += 1
            a = kvm.mmio_access
            exits.append(mmio_exit(a.write, a.size, a.addr, a.value))
            next_run = after_mmio.get(n_mmio, [])
        elif ret == RunResult.EINTR:
            exits.append(Exit(ExitKind.EINTR))
        elif ret == RunResult.ENOSYS:
            exits.append(Exit(ExitKind.ERROR, "KVM_RUN: ENOSYS"))
            outcome, detail = Outcome.NO_SYNDROME, kvm.ending
            break
        else:
            assert ret == RunResult.GUEST_ENDED, ret
            outcome, detail = kvm.ending, hw.log.detail
            break
    trace = Trace(stops, outcome, detail, tuple(exits), tuple(hw.why), skipped)
    if stop_at is not None:       # every stop was checked on arrival (fast-forwarded ones are ideal)
        trace.agreed = len(stops) - 1 if outcome == Outcome.DIVERGED else len(stops)
    if hw.log is not log and outcome != Outcome.DIVERGED:
        trace.final_regs = hw.log.final_regs()
    return trace


def _fast_forward(hw: GuestHw, shared: _Shared, stops: list[Stop], case) -> int:
    """Apply a run of ordinary instructions from a steady state; returns how many."""
    start = hw.idx
    if start >= len(shared.run_end):
        return 0
    # leave the last instruction of the run, and anything at an end condition
    # or a scheduled event, to the full loop
    i = min(shared.run_end[start], start + case.max_steps - hw.retired - 1)
    stop_events = shared.stop_events
    k = bisect.bisect_right(stop_events, len(stops))
    if k < len(stop_events):
        i = min(i, start + stop_events[k] - len(stops) - 1)
    if i <= start:
        return 0
    stops.extend(shared.ideal[start:i])
    hw.idx, hw.pc = i, hw.log.pcs[i]
    hw.retired += i - start
    return i - start
