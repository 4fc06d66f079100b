"""The vCPU as hardware runs it between a guest entry and the next exit to EL2.

This is the Software Step state machine of the Arm ARM (D2.11) with the
debug target at EL2 (MDCR_EL2.TDE, as KVM sets it while it debugs a guest)
and MDSCR_EL1.SS = 1, so every entry runs at most one guest instruction:

* PSTATE.SS = 0 on entry (active-pending): the step exception is taken before
  any instruction, with ISV = 0.
* PSTATE.SS = 1 (active-not-pending): the instruction at PC is attempted.  If
  it traps to EL2 (stage-2 fault, MMIO, trapped register or SMC) it did not
  complete and SPSR_EL2.SS is saved as 1; so does a hardware breakpoint on
  it or a BRK (both exit before it).  HVC completes and is taken with
  SS = 0.  Otherwise it completes, PSTATE.SS becomes 0 and the step exception
  follows at once, unless a host interrupt wins the race (saved SS = 0).

With MDSCR_EL1.SS = 0 (the VMM continues without stepping) the state
machine is inactive: instructions run, PSTATE.SS untouched, until one traps
to EL2.  Without MDCR_EL2.TDE (debug off) a BRK is the guest's own.

What each instruction does comes from the execution log of the guest CPU;
if KVM's emulation takes the guest off that path (an instruction skipped
without running), the log is re-executed along the new path.
"""
from __future__ import annotations

from typing import NamedTuple

from ..case import Case
from ..guest import BUDGET_SLACK, Access, ExecLog, Special
from ..isa import decode
from ..trace import HSR_BREAKPOINT, HSR_EX, HSR_NOT_STEPPED, HSR_STEPPED, hsr_brk
from ..vocabulary import FETCH_FAULT_WITH_STEP_DUE, IRQ_WITH_STEP_DUE, Completion, HwExitKind, Meets, Outcome, Trap

_NATIVE = Special()


class HwExit(NamedTuple):
    """An exception taken to EL2 (or the end of what the guest can do)."""
    kind: HwExitKind
    index: int = -1               # the dynamic instruction that caused it (-1: none)
    hsr: int = 0                  # SOFTSTEP, BRK, BREAKPOINT: the syndrome
    access: Access | None = None  # MMIO
    detail: str = ""              # STAGE2: fetch/data; ENDING: the run ending; HVC/SMC: "forwarded"


def _step_exit(index: int, hsr: int) -> HwExit:
    # the commonest exit, built without NamedTuple's Python-level __new__
    return tuple.__new__(HwExit, (HwExitKind.SOFTSTEP, index, hsr, None, ""))


class GuestHw:
    def __init__(self, log: ExecLog, irq_before: frozenset[int], irq_after: frozenset[int]):
        self.log = log
        self.case: Case = log.case
        self.pc = log.case.base
        self.idx = 0                  # dynamic index of the instruction at pc
        self.attempts = 0             # attempts at it so far (stage-2 faults re-run it)
        self.completed = False        # KVM emulated it; waiting for the PC skip
        self.ss = False               # PSTATE.SS as saved in the vCPU's cpsr
        self.retired = 0              # instructions completed, in total
        self.irq_armed = False        # a host interrupt is pending
        self.irq_before = set(irq_before)   # host interrupts before / after an instruction,
        self.irq_after = irq_after          # by dynamic index (from the case's events)
        self.skipped: list[int] = []  # PCs skipped without running
        self.why: list[str] = []      # events seen since the last stop (for signatures)
        # the debug configuration KVM programs at each entry
        self.stepping = True          # MDSCR_EL1.SS
        self.tde = True               # MDCR_EL2.TDE: debug exceptions go to EL2
        self.bps: frozenset[int] = frozenset()   # hardware breakpoints (DBGBVR/DBGBCR)
        self.note = ""                # why this model ended a run itself
        self.exec_faults = True       # a page read first faults again on its first fetch ("exec")
        self.entered = 0              # the instruction this entry from EL2 began at

    # ------------------------------------------------------------ entry

    def run(self) -> HwExit:
        """ERET into the guest; return the next exception to EL2."""
        self.entered = self.idx
        if not self.stepping:
            return self._run_free()
        if self.irq_armed:
            # A pending host interrupt is taken first (QEMU and real CPUs may
            # order it against a pending step exception either way; the
            # schedule says the interrupt wins).  SPSR.SS keeps PSTATE.SS.
            return self._irq()
        if not self.ss:
            self._tcg_order()
            return _step_exit(self.idx - 1, HSR_NOT_STEPPED)
        exit = self._attempt()
        if exit is not None:
            return exit
        # it completed natively: the step is done
        idx, log = self.idx - 1, self.log
        self.ss = False
        if self.irq_armed:
            return self._irq(idx)
        return _step_exit(idx, HSR_STEPPED | HSR_EX if log.pcs[idx] in log.load_exclusive_pcs else HSR_STEPPED)

    def _run_free(self) -> HwExit:
        """Run without stepping until something exits to EL2."""
        budget = self.case.max_steps + BUDGET_SLACK
        while self.retired < budget:
            if self.irq_armed:
                return self._irq()
            exit = self._attempt()
            if exit is not None:
                return exit
            if self.irq_armed:
                return self._irq(self.idx - 1)
        return HwExit(HwExitKind.ENDING, self.idx, detail=Outcome.MAX_STEPS)

    def _attempt(self) -> HwExit | None:
        """Attempt the instruction at PC: the exit it causes, or None if it
        completed natively (then PSTATE.SS is the caller's business)."""
        idx = self.idx
        if not self.stepping:
            self.log = self.log.with_monitor(idx, self.entered)
        log = self.log
        if self.attempts == 0 and idx in self.irq_before:
            self.irq_before.discard(idx)
            self.irq_armed = True
            return self._irq()
        special = log.specials.get(idx, _NATIVE) if idx < log.n else self._special_past_code(idx)
        # before it runs, every time -- unless an interrupt is taken at this
        # boundary first: then the instruction has not started
        if self.bps and self.pc in self.bps and not special.interrupt:
            return HwExit(HwExitKind.BREAKPOINT, idx, HSR_BREAKPOINT)
        attempt = self.attempts
        self.attempts += 1
        faults = self._faults(special)
        if attempt < len(faults):
            return HwExit(HwExitKind.STAGE2, idx, detail=faults[attempt])
        kind = special.kind
        if kind == Meets.NATIVE:
            if idx >= log.n and not self.stepping and self.pc == self.case.end:
                # the `b .` after the code: nothing but a breakpoint stops it
                return self._unmodelled(idx, "the guest reached the end of its code with debug off")
            self._retire(Completion.NATIVE)
            return None
        if kind in (Meets.HVC, Meets.HVC_FORWARDED):
            self.why.append(Trap.HVC)
            self._retire(Completion.HVC)    # HVC's preferred return is the next instruction
            if self.stepping:
                self.ss = False       # and it completes the step
            return HwExit(HwExitKind.HVC, idx, detail="forwarded" if kind == Meets.HVC_FORWARDED else "")
        if kind in (Meets.EXCEPTION, Meets.SVC):
            # taken to the guest's own EL1 in hardware (an SVC completes
            # first); the entry clears PSTATE.SS, so while stepping the step
            # exception is due at the vector before anything runs there
            self._retire(Completion.NATIVE if kind == Meets.SVC else Completion.TAKEN, kind == Meets.SVC)
            if self.stepping:
                self.ss = False
                self._tcg_order()
                return _step_exit(idx, HSR_NOT_STEPPED)
            return None
        if kind in (Meets.SMC, Meets.SMC_FORWARDED):
            return HwExit(HwExitKind.SMC, idx, detail="forwarded" if kind == Meets.SMC_FORWARDED else "")
        if kind == Meets.DBGREG:
            return HwExit(HwExitKind.DBGREG, idx)
        if kind == Meets.MMIO:
            return HwExit(HwExitKind.MMIO, idx, access=special.access)
        if kind == Outcome.NO_SYNDROME:
            return HwExit(HwExitKind.NO_SYNDROME, idx, detail=special.detail)
        if kind == Outcome.BREAKPOINT:
            if not self.tde:
                return self._unmodelled(idx, "a BRK with debug off is the guest's own exception")
            return HwExit(HwExitKind.BRK, idx, hsr_brk(decode(self.case.word_at(self.pc)).imm))
        return HwExit(HwExitKind.ENDING, idx, detail=kind)

    def _faults(self, special: Special) -> tuple[str, ...]:
        """The stage-2 faults the instruction takes on this era's KVM
        (without "exec" where KVM maps pages executable at once)."""
        if self.exec_faults or "exec" not in special.faults:
            return special.faults
        return tuple(f for f in special.faults if f != "exec")

    def _tcg_order(self) -> None:
        """A step is due: note what QEMU's TCG would take first (vocabulary.TCG_ORDERS)."""
        special = self.log.specials.get(self.idx)
        if special is None and self.idx == self.log.n and self.log.irq_at_end:
            self.why.append(IRQ_WITH_STEP_DUE)       # (taken at the `b .` after the code)
        if special is not None:
            if special.interrupt:
                self.why.append(IRQ_WITH_STEP_DUE)
            elif self._faults(special)[self.attempts:self.attempts + 1] in (("fetch",), ("exec",)):
                self.why.append(FETCH_FAULT_WITH_STEP_DUE)

    def _unmodelled(self, idx: int, why: str) -> HwExit:
        self.note = f"{why} (not modelled yet)"
        return HwExit(HwExitKind.ENDING, idx, detail=Outcome.UNSUPPORTED)

    def _irq(self, idx: int = -1) -> HwExit:
        # Named by the state it interrupts: taken while the step is still
        # active-not-pending (SS = 1) it changes nothing; taken in
        # active-pending (SS = 0) the kernel must not lose that state.
        self.irq_armed = False
        self.why.append("irq-pending" if not self.ss else "irq")
        return HwExit(HwExitKind.IRQ, idx)

    def _special_past_code(self, idx: int) -> Special:
        """What instruction `idx` >= log.n meets: the run's ending."""
        log = self.log
        if idx == log.n and log.outcome == Outcome.END:
            return _NATIVE            # the `b .` after the code
        if idx == log.n and log.outcome != Outcome.MAX_STEPS:
            return log.specials[idx]
        return Special(kind=Outcome.MAX_STEPS)

    def _retire(self, how: str, completes: bool = True) -> None:
        """On to the next dynamic instruction (`completes`: this one retired)."""
        idx = self.idx
        self.retired += completes
        self.why.append(how)
        self.idx = idx + 1
        self.pc = self.log.pcs[idx + 1] if idx < self.log.n else self.case.end
        self.attempts = 0
        if idx in self.irq_after:
            self.irq_armed = True

    # ------------------------------------------------------------ KVM's side

    def complete(self) -> None:
        """KVM emulated the trapped instruction at PC (its effects are the log's)."""
        self.retired += 1
        self.why.append(Completion.EMULATED)
        self.completed = True
        if self.idx in self.irq_after:
            self.irq_armed = True

    def skip(self) -> None:
        """PC += 4, past an emulated instruction (or, wrongly, past one that never ran)."""
        if self.completed:
            self.completed = False
            self.idx += 1
            self.pc += 4
            self.attempts = 0
            if self.pc == self.log.pcs[self.idx]:
                return
        else:
            self.skipped.append(self.pc)
            self.pc += 4
            self.attempts = 0
        # Off the ideal path: the guest goes on from the new PC.
        self.log = self.log.again((self.idx, "pc", self.pc))

    def write(self, reg: str, value: int, pending: bool = False) -> None:
        """A register written from outside (KVM_SET_ONE_REG, or KVM itself):
        the guest goes on from here with it (`pending`: after the trapped
        instruction at PC, which KVM completes on the next KVM_RUN)."""
        done = self.idx + 1 if self.completed or pending else self.idx
        if reg == "pc":
            self.pc = value
            self.attempts = 0
        self.log = self.log.again((done, reg, value))
