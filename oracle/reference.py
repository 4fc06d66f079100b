"""The reference: what a debugger should see, by the architecture.

Stepping alone, that is one stop after every completed instruction.  With the
VMM's side of the conversation (debug controls, breakpoints, register writes,
exits it answers) it is the Arm ARM's software-step state machine (D2.12)
with every trap KVM emulates treated as if the hardware had completed the
instruction: a completed instruction owes one step exception, taken before
anything else runs, wherever the PC then is; turning stepping off drops an
owed step, turning it on steps the next instruction; a hardware breakpoint
or a BRK stops before its instruction, with nothing stepped; a signal that
arrives while KVM handles an exit itself (a `trap` event) makes that KVM_RUN
return -EINTR, as it would on any kernel.

The same VMM (conversation.py) talks to this ideal kernel and to every era
model, so both hold the same conversation.
"""
from __future__ import annotations

from .conversation import Schedule, converse
from .guest import BUDGET_SLACK, ExecLog
from .trace import HSR_BREAKPOINT, HSR_EX, HSR_NOT_STEPPED, HSR_STEPPED, RefTrace, hsr_brk
from .isa import decode
from .vocabulary import ExitReason, Meets, Outcome, RunResult

# VMM actions that change nothing a correct kernel shows
INVISIBLE = frozenset(("immediate-exit", "signal", "preempt", "host-irq"))
# what the guest meets that a correct kernel completes without telling the VMM
IN_KERNEL = (Meets.NATIVE, Meets.DBGREG, Meets.HVC, Meets.SMC)
HANDLED_IN_KERNEL = IN_KERNEL[1:]      # ... of which these exit to KVM (an MMIO to an in-kernel device too)
# what makes stops other than one per completed instruction: exits the VMM
# answers, and exceptions taken in the guest (a step ends at the vector)
TALKING = (Meets.HVC_FORWARDED, Meets.SMC_FORWARDED, Meets.EXCEPTION, Meets.SVC)


def reference(log: ExecLog) -> RefTrace:
    """Stops of the ideal stepper for the execution in `log`."""
    case = log.case
    if all(e.what in INVISIBLE for e in case.events) and not _talks(log):
        # Stepping alone: stop i is at the PC of instruction i+1.  The bound
        # wins over whatever comes after it, as in the models.
        limit = case.max_steps
        if log.n > limit or (log.n == limit and log.outcome != Outcome.END):
            return RefTrace(log.pcs[1:limit + 1], Outcome.MAX_STEPS)
        return RefTrace(log.pcs[1:], log.outcome, log.detail)
    kernel = IdealKvm(log)
    trace = converse(kernel, kernel, case, Schedule(case))
    final = kernel.log.final_regs() if kernel.log is not log else None
    return RefTrace([s.pc for s in trace.stops], trace.outcome, trace.detail, trace.stops, trace.tail, final,
                    kernel.singlestep, kernel.log.irq_at_end)


def _talks(log: ExecLog) -> bool:
    """Does the guest meet anything the VMM answers besides MMIO (a BRK, a
    forwarded hypercall, an access without a syndrome it may emulate)?"""
    return log.outcome == Outcome.BREAKPOINT or any(
        s.kind in TALKING for s in log.specials.values()) or (
        log.outcome == Outcome.NO_SYNDROME and log.case.nisv != "end")


class IdealKvm:
    """A kernel that follows the architecture, and the guest CPU it runs
    (it is its own `cpu` for the conversation)."""

    def __init__(self, log: ExecLog):
        self.log, self.case = log, log.case
        self.idx, self.pc, self.retired = 0, log.case.base, 0
        self.pc_before = self.pc       # the PC of the last completed instruction
        self.owed = False              # a completed instruction's step exception not yet taken
        self.mmio_open = False         # an MMIO exit waiting for its completion
        self.enabled = self.singlestep = True
        self.bps: frozenset[int] = frozenset()
        self.exit_reason = ExitReason.UNKNOWN
        self.hsr, self.mmio_access, self.hypercall = 0, None, ""
        self.ending = self.detail = ""
        self.signal = False
        self.signal_on_trap = {e.at - 1 for e in log.case.events if e.when == "trap"}   # by dynamic index
        self.why: list[str] = []
        self.skipped: list[int] = []
        self.entered = 0               # the instruction the guest's last entry from EL2 began at

    # ------------------------------------------------------------ ioctls

    def set_guest_debug(self, enable: bool, singlestep: bool, bps: frozenset[int]) -> None:
        self.enabled, self.singlestep = enable, enable and singlestep
        self.bps = bps if enable else frozenset()
        if not self.singlestep:
            self.owed = False          # turning stepping off drops a pending step

    def set_irq_line(self, line: str, level: int) -> None:
        # seen from the next instruction on (after an MMIO exit, after the
        # access that completes on the next KVM_RUN)
        self.log = self.log.again((self.idx + self.mmio_open, line, level))

    def set_one_reg(self, reg: str, value: int) -> None:
        self.log = self.log.again((self.idx, reg, value))
        if reg == "pc":
            self.pc = value

    def ioctl_run(self, immediate_exit: bool = False, preempt: bool = False) -> RunResult:
        if self.mmio_open:             # the exit completes on this KVM_RUN, whatever else happens
            self.mmio_open = False
            self._retire()
            self.owed = self.singlestep
        if immediate_exit or self.signal:
            self.signal = False
            return RunResult.EINTR
        budget = self.case.max_steps + BUDGET_SLACK
        self.entered = self.idx
        while True:
            if self.singlestep and self.owed:
                self.owed = False
                return self._debug(HSR_NOT_STEPPED)
            if self.retired >= budget:        # (as the models bound a guest that runs free)
                return self._end(Outcome.MAX_STEPS, "")
            log, idx = self.log, self.idx
            special = log.specials.get(idx) if idx <= log.n else None
            if not self.singlestep:
                if special is not None and special.faults:
                    self.entered = idx         # it runs again after the stage-2 fault's return
                self.log = log.with_monitor(idx, self.entered)
                if self.log is not log:        # a store-exclusive that succeeds: the guest's new path
                    log = self.log
                    special = log.specials.get(idx) if idx <= log.n else None
            kind = special.kind if special is not None else Meets.NATIVE
            if self.pc in self.bps and not (special is not None and special.interrupt):
                return self._debug(HSR_BREAKPOINT)        # (an interrupt at this boundary comes first)
            if idx >= log.n:
                if log.outcome == Outcome.END or idx > log.n:
                    if not self.singlestep:
                        return self._end(Outcome.UNSUPPORTED,
                                         "the guest reached the end of its code with debug off (not modelled yet)")
                    kind = Meets.NATIVE        # the `b .` after the code
                elif log.outcome == Outcome.MAX_STEPS:
                    return self._end(Outcome.MAX_STEPS, "")
            if idx in self.signal_on_trap and (special is not None and special.faults or kind in HANDLED_IN_KERNEL
                                               or kind == Meets.MMIO and special.access.kernel):
                # a signal arrives while KVM handles this instruction's first
                # exit itself: KVM_RUN returns -EINTR before the guest runs again
                self.signal_on_trap.discard(idx)
                if not special.faults:
                    self._retire()             # (emulated: it completed, its step is owed)
                    self.owed = self.singlestep
                return RunResult.EINTR
            if kind in IN_KERNEL:
                self._retire()
                if self.singlestep:
                    return self._debug(HSR_STEPPED | HSR_EX if self.pc_before in log.load_exclusive_pcs else HSR_STEPPED)
                if kind != Meets.NATIVE:
                    self.entered = self.idx    # a trap to EL2 and back
                continue
            if kind in (Meets.EXCEPTION, Meets.SVC):
                # an exception entry completes a step at the vector; only an
                # SVC retired on the way
                self._retire(kind == Meets.SVC)
                if self.singlestep:
                    return self._debug(HSR_NOT_STEPPED)
                continue
            if kind in (Meets.HVC_FORWARDED, Meets.SMC_FORWARDED):
                self._retire()
                self.owed = self.singlestep
                self.exit_reason = ExitReason.HYPERCALL
                self.hypercall = "hvc" if kind == Meets.HVC_FORWARDED else "smc"
                return RunResult.HYPERCALL
            if kind == Meets.MMIO:
                if special.access.kernel:
                    self._retire()
                    if self.singlestep:
                        return self._debug(HSR_STEPPED)
                    self.entered = self.idx
                    continue
                self.mmio_open = True
                self.exit_reason = ExitReason.MMIO
                self.mmio_access = special.access
                return RunResult.MMIO
            if kind == Outcome.BREAKPOINT:
                if not self.enabled:
                    return self._end(Outcome.UNSUPPORTED, "a BRK with debug off is the guest's own exception (not modelled yet)")
                return self._debug(hsr_brk(decode(self.case.word_at(self.pc)).imm))
            if kind == Outcome.NO_SYNDROME:
                self.ending = special.detail
                return RunResult.ENOSYS
            return self._end(kind, log.detail)

    # ------------------------------------------------------------ bookkeeping

    def _retire(self, completes: bool = True) -> None:
        """On to the next dynamic instruction (`completes`: this one retired)."""
        log = self.log
        self.pc_before = self.pc
        self.retired += completes
        self.idx += 1
        self.pc = log.pcs[self.idx] if self.idx <= log.n else self.case.end

    def _debug(self, hsr: int) -> RunResult:
        self.exit_reason, self.hsr = ExitReason.DEBUG, hsr
        return RunResult.DEBUG

    def _end(self, outcome: str, detail: str) -> RunResult:
        self.ending, self.detail = outcome, detail
        return RunResult.GUEST_ENDED
