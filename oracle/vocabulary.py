"""The oracle's vocabulary: every kind of outcome, exit and divergence, once.

Each is a StrEnum whose values are what case files, `--json` output and
crash directories have always said, so a member compares equal to (and
serialises as) its old string.
"""
from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    """How a run ended.  `end` and `max-steps` are normal; the others stop the
    run at an instruction the reference and the models treat alike."""
    END = "end"
    MAX_STEPS = "max-steps"
    GUEST_EXCEPTION = "guest-exception"   # an exception taken to the guest's own EL1
    UNSUPPORTED = "unsupported"           # an instruction stepfuzz does not model
    NO_SYNDROME = "no-syndrome"           # MMIO without a valid ISS: KVM_RUN fails with ENOSYS
    BREAKPOINT = "breakpoint"             # a BRK or breakpoint stop that no event answered
    LEFT_CODE = "left-code"               # the guest branched outside its code
    STUCK = "stuck"                       # a model made no progress (never expected)
    DIVERGED = "diverged"                 # a model stopped at its first divergence, on request
    NOT_REPRODUCIBLE = "not-reproducible" # the case needs a KVM feature this era's kernels lack


class DivergenceKind(StrEnum):
    """What is wrong with the first stop that differs from the reference."""
    ZERO_STEP = "zero-step"
    MULTI_STEP = "multi-step"
    SKIPPED = "skipped-instruction"
    PC_MISMATCH = "pc-mismatch"
    STOP_KIND = "stop-kind-mismatch"      # right PC and steps, another kind of debug exit
    MISSING_STOP = "missing-stop"
    EXTRA_STOP = "extra-stop"
    OUTCOME = "outcome-mismatch"
    STATE = "state-mismatch"


class ExitKind(StrEnum):
    """A KVM_RUN return that is not a stop, as a trace records it."""
    MMIO = "mmio"
    EINTR = "eintr"
    ERROR = "error"
    HYPERCALL = "hypercall"               # KVM_EXIT_HYPERCALL (an SMCCC call forwarded to the VMM)


class RunResult(StrEnum):
    """What one KVM_RUN returns to the VMM, in a model."""
    DEBUG = "debug"                       # KVM_EXIT_DEBUG: a stop
    MMIO = "mmio"                         # KVM_EXIT_MMIO
    HYPERCALL = "hypercall"               # KVM_EXIT_HYPERCALL
    EINTR = "eintr"                       # -EINTR (immediate_exit or a signal)
    ENOSYS = "enosys"                     # -ENOSYS (an access without a syndrome)
    GUEST_ENDED = "guest-ended"           # the guest reached a run ending


class ExitReason(StrEnum):
    """kvm_run->exit_reason as KVM leaves it for userspace."""
    UNKNOWN = "unknown"
    DEBUG = "debug"
    MMIO = "mmio"
    INTR = "intr"
    HYPERCALL = "hypercall"


class HwExitKind(StrEnum):
    """An exception taken to EL2 while the guest runs (or the end of what it can do)."""
    SOFTSTEP = "softstep"
    IRQ = "irq"
    STAGE2 = "stage2"
    DBGREG = "dbgreg"
    MMIO = "mmio"
    HVC = "hvc"
    SMC = "smc"                   # trapped by HCR_EL2.TSC, not completed
    BRK = "brk"                   # a breakpoint instruction (MDCR_EL2.TDE)
    BREAKPOINT = "breakpoint"     # a hardware breakpoint, before the instruction
    NO_SYNDROME = "no-syndrome"
    ENDING = "ending"


class Meets(StrEnum):
    """What one dynamic instruction meets besides running natively (the guest
    CPU's log); a run ending is recorded as its Outcome instead."""
    NATIVE = "native"
    MMIO = "mmio"
    DBGREG = "dbgreg"
    HVC = "hvc"
    SMC = "smc"
    # an HVC or SMC the VMM asked KVM to forward to it (KVM_EXIT_HYPERCALL)
    HVC_FORWARDED = "hvc-forwarded"
    SMC_FORWARDED = "smc-forwarded"
    # exceptions taken to the guest's own EL1, in hardware: the instruction
    # did not complete (UNDEF, FP trap, an interrupt taken before it), or
    # an SVC completed first; either way the next instruction is at a vector
    EXCEPTION = "exception"
    SVC = "svc"


class Trap(StrEnum):
    """A trap to KVM recorded in a stop's record (Stop.why); the signature's
    cause is built from these and from the events beside them."""
    MMIO = "mmio"
    MMIO_KERNEL = "mmio-kernel"
    DBGREG = "dbgreg"
    HVC = "hvc"
    SMC = "smc"
    HYPERCALL = "hypercall"
    STAGE2_FETCH = "stage2-fetch"
    STAGE2_DATA = "stage2-data"


# A stop's record (Stop.why) notes where the hardware model chose an order:
# an interrupt pending and unmasked at an entry whose step is already due
# (active-pending).  The model takes the step first, as the reference does;
# QEMU's TCG takes the interrupt first (it checks interrupts before it runs a
# translation, and raises that step exception inside one), so a real kernel
# under TCG cannot show what a CPU does there.
IRQ_WITH_STEP_DUE = "irq-with-step-due"
# ... and where a step is due at an entry whose next fetch takes a stage-2
# fault: the architecture gives the step priority over the instruction abort
# (as the model does); QEMU's TCG looks the instruction up first, so the
# fault reaches KVM with the step still due (an exception entry's step, on a
# vector page not mapped executable yet).
FETCH_FAULT_WITH_STEP_DUE = "fetch-fault-with-step-due"
TCG_ORDERS = {IRQ_WITH_STEP_DUE: "an interrupt", FETCH_FAULT_WITH_STEP_DUE: "a stage-2 fault on the next fetch"}


class Completion(StrEnum):
    """Markers in a stop's record of what happened (Stop.why): where an
    instruction completed, and how.  Everything else in that record is a trap
    or an event; `is_completion` tells them apart."""
    NATIVE = "|native"
    EMULATED = "|emulated"
    HVC = "|hvc"
    TAKEN = "|taken"              # nothing completed: an exception was taken to the guest's EL1


class Ec(StrEnum):
    """What kind of debug exception a stop (KVM_EXIT_DEBUG) reports."""
    SOFTSTEP = "softstep"
    BRK = "brk"
    BREAKPOINT = "breakpoint"
    WATCHPOINT = "watchpoint"


COMPLETIONS = frozenset(Completion)


def is_completion(token: str) -> bool:
    return token in COMPLETIONS


class SmcAbi(StrEnum):
    """How KVM answers a trapped SMC (docs/eras.md).  The guest's state after
    one depends on it, so an execution log is made for one of them."""
    ALL_ONES = "all-ones"         # x0 = ~0, skipped (v4.16, f5115e8869e1)
    SMCCC = "smccc"               # skipped, then an SMCCC call like HVC when imm is 0 (v6.4, c2d2e9b3d8ce)
