"""An era model's run of a case: the VMM's conversation (conversation.py)
with the era's KVM (kernel.py) over the hardware model (hardware.py).

This is what QEMU's gdbstub or a KVM selftest does; `model_trace` turns the
stops it sees into a Trace.
"""
from __future__ import annotations

import bisect
import itertools

from ..conversation import Schedule, converse
from ..guest import ExecLog
from ..trace import HSR_STEPPED, Exit, RefTrace, Stop, Trace
from ..vocabulary import Completion
from .eras import Era
from .hardware import GuestHw
from .kernel import Kvm

PLAIN_WHY = (Completion.NATIVE,)

# Model states (per era) from which one plain instruction -- no trap, no
# event -- gives one ordinary stop and leaves the state exactly as it was.
# Learned by running the full loop, then used to apply runs of plain
# instructions in bulk.  Nothing here is assumed about any era.
_STEADY: set[tuple] = set()
FAST_FORWARD = True         # tests switch it off to check it changes nothing


def _state(kvm: Kvm, hw: GuestHw) -> tuple:
    return (kvm.era.id, hw.ss, hw.irq_armed, hw.completed, hw.attempts, kvm.exit_reason, kvm.mmio_needed,
            kvm.increment_pc, kvm.ss_active_pending, kvm.host_ss_active_pending, kvm.signal,
            kvm.enabled, kvm.singlestep, hw.stepping, hw.tde)


class _Shared:
    """Per execution log, computed once and shared by every era: the case's
    exit schedule as the run loop consumes it, where runs of ordinary
    instructions (completing natively, nothing to report, no event) end, and
    the stop each of them gives."""

    def __init__(self, log: ExecLog):
        events = log.case.events
        self.schedule = Schedule(log.case)
        self.irq_before = frozenset(e.at - 1 for e in events if e.when == "before")
        self.irq_after = frozenset(e.at - 1 for e in events if e.when == "after")
        self.signal_on_trap = frozenset(e.at - 1 for e in events if e.when == "trap")
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
        if n and (pcs[n] == end or log.case.code_word(pcs[n]) is None):
            # the guest stops at the end, or outside its code (converse ends the
            # run there): only its last instruction reaches it
            handled.add(n - 1)
        self.run_end: list[int] = []
        for b in sorted(i for i in handled if i < n) + [n]:
            self.run_end += [b] * (b + 1 - len(self.run_end))


def _shared(log: ExecLog) -> _Shared:
    cached = getattr(log, "_shared", None)
    if cached is None:
        cached = log._shared = _Shared(log)
    return cached


class _FastForward:
    """Applies runs of ordinary instructions from a steady state in bulk."""

    def __init__(self, kvm: Kvm, log: ExecLog, shared: _Shared):
        self.kvm, self.hw, self.log, self.shared = kvm, kvm.hw, log, shared
        self.before: tuple | None = None

    def skip(self, stops: list[Stop], exits: list[Exit], pending: list) -> bool:
        hw, kvm, log = self.hw, self.kvm, self.log
        idx = hw.idx
        # the next instruction is ordinary, and nothing is pending
        ordinary = (idx < log.n and self.shared.run_end[idx] > idx and not pending and not exits
                    and not hw.why and hw.log is log and not kvm.bps)
        self.before = _state(kvm, hw) if ordinary else None
        if self.before not in _STEADY or not FAST_FORWARD:
            return False
        return self._apply(stops) > 0

    def learn(self, stop: Stop) -> None:
        before = self.before
        if (before is not None and stop.hsr == HSR_STEPPED and stop.why == PLAIN_WHY and not stop.exits
                and self.hw.log is self.log and _state(self.kvm, self.hw) == before):
            _STEADY.add(before)
        self.before = None

    def _apply(self, stops: list[Stop]) -> int:
        hw, shared, case = self.hw, self.shared, self.log.case
        start = hw.idx
        if start >= len(shared.run_end):
            return 0
        # leave the last instruction of the run, and anything at an end
        # condition or a scheduled event, to the full loop
        i = min(shared.run_end[start], start + case.max_steps - hw.retired - 1,
                start + case.max_steps - len(stops) - 1)
        stop_events = shared.schedule.stop_events
        k = bisect.bisect_right(stop_events, len(stops))
        if k < len(stop_events):
            i = min(i, start + stop_events[k] - len(stops) - 1)
        if i <= start:
            return 0
        stops.extend(shared.ideal[start:i])
        hw.idx, hw.pc = i, hw.log.pcs[i]
        hw.retired += i - start
        return i - start


def model_trace(era: Era, log: ExecLog, stop_at: RefTrace | None = None) -> Trace:
    """The era's trace of the execution in `log`.  With `stop_at` (the
    reference) the run ends at the first stop that differs from it: all a
    signature needs, for a fraction of the cost."""
    shared = _shared(log)
    hw = GuestHw(log, shared.irq_before, shared.irq_after)
    kvm = Kvm(era, hw)
    kvm.signal_on_trap = set(shared.signal_on_trap)
    trace = converse(kvm, hw, log.case, shared.schedule, stop_at, _FastForward(kvm, log, shared))
    if hw.log is not log and trace.outcome != "diverged":
        trace.final_regs = hw.log.final_regs()
    return trace
