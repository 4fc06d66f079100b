"""Traces: what a VMM sees when it single-steps a guest.

A stop is one KVM_EXIT_DEBUG.  The reference stops after every completed
instruction; a model (or a real kernel) stops wherever its mechanics say.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from .vocabulary import Ec, ExitKind, is_completion

# Syndromes KVM reports in kvm_run.debug.arch.hsr for a step
EC_SOFTSTP_LOW = 0x32
HSR_STEPPED = (EC_SOFTSTP_LOW << 26) | (1 << 25) | (1 << 24) | 0x22   # ISV=1: an instruction was stepped
HSR_NOT_STEPPED = (EC_SOFTSTP_LOW << 26) | (1 << 25) | 0x22            # ISV=0: taken before any instruction
HSR_EX = 1 << 6                                                         # the stepped instruction was a load-exclusive
HSR_FAKED = EC_SOFTSTP_LOW << 26                                        # what 4.15-era KVM writes when it fakes a step
EC_HW_BP_LOW, EC_WATCHPT_LOW, EC_BRK64 = 0x30, 0x34, 0x3C
HSR_BREAKPOINT = (EC_HW_BP_LOW << 26) | (1 << 25) | 0x22               # a hardware breakpoint (debug IFSC)
EC_KINDS = {EC_SOFTSTP_LOW: Ec.SOFTSTEP, EC_BRK64: Ec.BRK, EC_HW_BP_LOW: Ec.BREAKPOINT, EC_WATCHPT_LOW: Ec.WATCHPOINT}


def hsr_brk(imm: int) -> int:
    """The syndrome of a BRK #imm exit."""
    return (EC_BRK64 << 26) | (1 << 25) | (imm & 0xFFFF)


def ec_of(hsr: int) -> str:
    """A stop's kind of debug exception, from its syndrome (hex for any other EC)."""
    ec = hsr >> 26
    return EC_KINDS.get(ec, f"ec-{ec:#x}")


INTERRUPT_VECTORS = ("irq", "fiq", "serror")


def interrupt_vector(case, stop: "Stop") -> str:
    """The interrupt (irq, fiq, serror) whose vector `stop` lands on with
    nothing retired, else "".  The architecture allows such a step (the
    interrupt was taken before any instruction) and every kernel shows it;
    a debugger would rather not (arm64 has no KVM_GUESTDBG_BLOCKIRQ), so it
    is counted and reported as its own kind of stop, never as a bug."""
    if stop.steps or case.vectors is None:
        return ""
    for kind in INTERRUPT_VECTORS:
        if stop.pc == case.vector(kind):
            return kind
    return ""


class Exit(NamedTuple):
    """A KVM_RUN return that is not a stop."""
    kind: ExitKind
    detail: str = ""


def events_only(why: tuple[str, ...]) -> tuple[str, ...]:
    """`why` without completion markers, for people."""
    return tuple(w for w in why if not is_completion(w))


def mmio_exit(write: bool, size: int, addr: int, data: int) -> "Exit":
    """A KVM_EXIT_MMIO as traces show it, model and real alike."""
    return Exit(ExitKind.MMIO, f"{'write' if write else 'read'} {size} bytes at {addr:#x}: {data:#x}")


def numbered_exits(stops: "list[Stop]", tail: "tuple[Exit, ...]") -> "list[tuple[int, Exit]]":
    """Every non-stop exit of a trace with the number of stops before it."""
    return [(i, e) for i, s in enumerate(stops) for e in s.exits] + [(len(stops), e) for e in tail]


class Stop(NamedTuple):
    pc: int
    steps: int                # instructions completed since the previous stop
    hsr: int                  # the syndrome KVM reported
    exits: tuple[Exit, ...] = ()   # non-stop KVM_RUN returns since the previous stop
    why: tuple[str, ...] = ()      # traps, events and Completions in between, in order

    @property
    def isv(self) -> int:
        return (self.hsr >> 24) & 1

    @property
    def ec(self) -> str:
        return ec_of(self.hsr)


@dataclass
class Trace:
    """A model's (or a real kernel's) run of one case."""
    stops: list[Stop]
    outcome: str              # how the run ended: an Outcome
    detail: str = ""
    tail: tuple[Exit, ...] = ()        # exits after the last stop
    tail_why: tuple[str, ...] = ()     # what happened after the last stop
    skipped: list[tuple[int, int]] = field(default_factory=list)   # (stop index, pc) never executed
    final_regs: dict[str, int] | None = None
    agreed: int = 0                    # leading stops known to match the reference (checked as they came)
    stepping_at_end: bool = True       # False: the run ended with nothing stepping (it may run free)


@dataclass
class RefTrace:
    """The ideal trace.  Stepping alone it is one stop after every completed
    instruction (`pcs`); with the VMM's side of the conversation (debug
    controls, breakpoints, exits it answers) `full` holds its stops, whose
    steps and kinds vary."""
    pcs: list[int]            # stop i is at pcs[i]
    outcome: str
    detail: str = ""
    full: list[Stop] | None = None     # None: every stop is one step, a software step
    tail: tuple[Exit, ...] = ()
    final_regs: dict[str, int] | None = None   # when the VMM's writes took it off the ideal path
    stepping_at_end: bool = True       # False: it ran past max_steps with nothing stepping
    irq_at_end: str | None = None      # an interrupt taken at the end of the code (before a breakpoint there)

    @property
    def stops(self) -> list[Stop]:
        if self.full is not None:
            return self.full
        return [Stop(pc, 1, HSR_STEPPED) for pc in self.pcs]

    def stop_at(self, i: int) -> Stop:
        return Stop(self.pcs[i], 1, HSR_STEPPED) if self.full is None else self.full[i]

    def steps_at(self, i: int) -> int:
        return 1 if self.full is None else self.full[i].steps

    def ec_at(self, i: int) -> str:
        return Ec.SOFTSTEP if self.full is None else self.full[i].ec
