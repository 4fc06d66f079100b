"""What each AArch64 instruction word means to the hypervisor.

A pure-Python decoder of the few fields that decide whether and how an
instruction exits to KVM: loads/stores (and the data-abort syndrome KVM
would get for them), trapped debug system registers, HVC, and the
instructions stepfuzz does not model.  It is fast enough for the fuzzing hot
path (results are cached per word); capstone is used only for text.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from functools import lru_cache


class InsnClass(IntEnum):
    """What an instruction is to the hypervisor."""
    PLAIN = 0             # runs natively, never exits
    MEM = 1               # a load or store (a data abort if it reaches MMIO)
    DBGREG = 2            # a debug register access, trapped while KVM debugs the guest
    HVC = 3
    STORE_EXCLUSIVE = 4   # always fails under stepping
    UNSUPPORTED = 5       # not modelled
    BRK = 6               # a breakpoint instruction: a debug exit while KVM debugs the guest
    SMC = 7               # trapped to KVM (HCR_EL2.TSC) and emulated there
    GUEST_EXCEPTION = 8   # takes an exception to the guest's own EL1 (SVC, UDF, HLT, FP with FPEN = 0)
    ERET = 9              # an exception return, at EL1: runs natively


MASK64 = (1 << 64) - 1
NOP = 0xD503201F
B_SELF = 0x14000000               # `b .`


@dataclass(frozen=True, slots=True)
class Insn:
    kind: InsnClass
    # MEM: the data-abort syndrome fields (valid only when iss is True)
    iss: bool = False         # would a data abort carry a valid ISS (single GPR, no writeback)?
    write: bool = False
    size: int = 0             # access size in bytes
    rt: int = 0
    rs: int = 0               # STORE_EXCLUSIVE: the status register
    signed: bool = False      # SSE: sign-extend the loaded value
    sf: bool = False          # SF: the destination is a 64-bit register
    load_exclusive: bool = False
    # DBGREG: which trapped debug register; HVC: its immediate
    reg: str = ""
    imm: int = 0
    reason: str = ""          # UNSUPPORTED: why; GUEST_EXCEPTION: which (an EXCEPTIONS key)
    # Unicorn must stop before it: it cannot run natively (derived; a field,
    # not a property, because the guest CPU asks it of every word of a case)
    stops: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stops", self.kind >= InsnClass.STORE_EXCLUSIVE)


# The exceptions an instruction takes to the guest's EL1: whether it retires
# first (SVC's preferred return is the next instruction; the others return
# to themselves) and its syndrome's EC, as ESR_EL1 shows it.
@dataclass(frozen=True, slots=True)
class GuestException:
    retires: bool
    ec: int


EXCEPTIONS = {"svc": GuestException(True, 0x15),
              "undef": GuestException(False, 0x00),      # UDF, HLT (halting debug disabled)
              "fp": GuestException(False, 0x07),         # FP/SIMD while CPACR_EL1.FPEN = 0
              "alignment": GuestException(False, 0x25)}  # a data abort at EL1 (see aligned_access)


def aligned_access(w: int) -> bool:
    """Must this load/store be aligned to its size whatever the memory type?
    Load-acquire/store-release and load-exclusive (and, without FEAT_LSE2,
    which neither Unicorn's Cortex-A72 nor QEMU 7.2's `max` has, that is
    all sizes): a misaligned address is an alignment fault at EL1."""
    return (w & 0x3FA00000) == 0x08800000 or (w & 0x3FC00000) == 0x08400000


_PLAIN = Insn(InsnClass.PLAIN)

# op0=3 system registers that never trap to KVM and behave alike in Unicorn
# and on a real CPU: (op1, CRn, CRm, op2) -> name, and whether writes are fine.
NATIVE_SYSREGS = {
    (3, 13, 0, 2): ("tpidr_el0", True),
    (3, 13, 0, 3): ("tpidrro_el0", True),
    (0, 13, 0, 4): ("tpidr_el1", True),
    (3, 4, 2, 0): ("nzcv", True),
    (3, 4, 2, 1): ("daif", True),
    (0, 4, 1, 0): ("sp_el0", True),
    (0, 4, 2, 2): ("currentel", False),
    (0, 4, 2, 0): ("spsel", True),
    # the EL1 exception registers: never trapped (TVM traps writes of ESR
    # and FAR, so only their reads are native)
    (0, 4, 0, 1): ("elr_el1", True),
    (0, 4, 0, 0): ("spsr_el1", True),
    (0, 5, 2, 0): ("esr_el1", False),
    (0, 6, 0, 0): ("far_el1", False),
}

DEBUG_REG_KINDS = {4: "dbgbvr", 5: "dbgbcr", 6: "dbgwvr", 7: "dbgwcr"}
DEBUG_REG_COUNT = 4           # breakpoints/watchpoints both Unicorn and QEMU's `max` CPU have


def unsupported(reason: str) -> Insn:
    return Insn(InsnClass.UNSUPPORTED, reason=reason)


def guest_exception(which: str, imm: int = 0) -> Insn:
    return Insn(InsnClass.GUEST_EXCEPTION, reason=which, imm=imm)


# A fresh vCPU has CPACR_EL1.FPEN = 0, so FP/SIMD traps to the guest's own
# EL1 (that trap is checked before KVM's lazy-FP trap to EL2).
FP_SIMD = guest_exception("fp")
UNDEF = guest_exception("undef")
ERET = Insn(InsnClass.ERET)


@lru_cache(maxsize=1 << 14)     # a campaign's hit rate: 96.3 % (65,536 entries: 96.7 %, at four times the memory)
def decode(w: int) -> Insn:
    if (w & 0x0A000000) == 0x08000000:
        return _load_store(w)
    if (w & 0xFF000000) == 0xD4000000:
        return _exception(w)
    if (w & 0xFFC00000) == 0xD5000000:
        return _system(w)
    if (w & 0x0E000000) == 0x0E000000:
        return FP_SIMD
    if (w & 0xFE000000) == 0xD6000000:            # branch to register
        if (w & 0xFF9FFC1F) == 0xD61F0000:        # BR, BLR, RET (no pointer authentication)
            return _PLAIN
        if w == 0xD69F03E0:
            return ERET
        return unsupported("dret, authenticated or unallocated branch")
    if w >> 16 == 0:                              # UDF #imm16
        return UNDEF
    return _PLAIN


def _load_store(w: int) -> Insn:
    v = (w >> 26) & 1
    if v:
        return FP_SIMD
    size = w >> 30
    # Armv8.1+ forms (CAS, CASP, LSE atomics, LDRAA): Unicorn's Cortex-A72
    # rejects them while QEMU's `max` CPU runs them, so they are not modelled.
    if ((w & 0x3FA07C00) == 0x08A07C00 or (w & 0xBFA07C00) == 0x08207C00
            or (w & 0x3B200C00) == 0x38200000 or (w & 0x3B200400) == 0x38200400):
        return unsupported("Armv8.1+ atomic or pointer-authenticated load")
    if (w & 0x3FC00000) == 0x08000000:            # STXR, STLXR, STXP, STLXP
        return Insn(InsnClass.STORE_EXCLUSIVE, write=True, size=1 << size, rt=w & 31, rs=(w >> 16) & 31)
    if (w & 0x3B000000) == 0x39000000 or (
            (w & 0x3B200000) == 0x38000000 and ((w >> 10) & 3) in (0, 2)) or (
            (w & 0x3B200C00) == 0x38200800):
        # unsigned offset, unscaled, unprivileged or register offset: single
        # register, no writeback -> valid syndrome
        return _single(w, size, (w >> 22) & 3)
    if (w & 0x3B000000) == 0x18000000:            # load literal
        opc = size
        if opc == 3:
            return _PLAIN                          # PRFM (literal): no access
        return Insn(InsnClass.MEM, iss=True, size=4 << (opc & 1) if opc < 2 else 4, rt=w & 31,
                    signed=opc == 2, sf=opc != 0)
    if (w & 0x3FA00000) == 0x08800000:            # load-acquire / store-release, single register
        write = not (w >> 22) & 1
        return Insn(InsnClass.MEM, iss=True, write=write, size=1 << size, rt=w & 31, sf=size == 3)
    load_excl = (w & 0x3FC00000) == 0x08400000
    write = False if load_excl else _guess_write(w)
    return Insn(InsnClass.MEM, iss=False, write=write, size=1 << size, rt=w & 31, load_exclusive=load_excl)


def _single(w: int, size: int, opc: int) -> Insn:
    """A general register load/store: the syndrome is valid."""
    nbytes = 1 << size
    rt = w & 31
    if opc == 0:
        return Insn(InsnClass.MEM, iss=True, write=True, size=nbytes, rt=rt, sf=size == 3)
    if opc == 1:
        return Insn(InsnClass.MEM, iss=True, size=nbytes, rt=rt, sf=size == 3)
    if opc == 2:
        if size == 3:
            return _PLAIN                          # PRFM / PRFUM: a hint, no access
        return Insn(InsnClass.MEM, iss=True, size=nbytes, rt=rt, signed=True, sf=True)
    if size >= 2:
        return unsupported("unallocated load/store encoding")
    return Insn(InsnClass.MEM, iss=True, size=nbytes, rt=rt, signed=True, sf=False)


def _guess_write(w: int) -> bool:
    # For forms without a syndrome only the direction is reported; bit 22 is
    # L (load) in pairs, exclusives and the writeback forms of single registers.
    if (w & 0x3A000000) == 0x28000000 or (w & 0x3F000000) == 0x08000000:
        return not (w >> 22) & 1
    return ((w >> 22) & 3) == 0


def _exception(w: int) -> Insn:
    opc, ll = (w >> 21) & 7, w & 3
    imm = (w >> 5) & 0xFFFF
    if (w >> 2) & 7:
        return UNDEF                               # op2 != 0: unallocated, UNDEFINED
    if (opc, ll) == (0, 2):
        return Insn(InsnClass.HVC, imm=imm)
    if (opc, ll) == (0, 3):
        return Insn(InsnClass.SMC, imm=imm)
    if (opc, ll) == (1, 0):
        return Insn(InsnClass.BRK, imm=imm)
    if (opc, ll) == (0, 1):
        return guest_exception("svc", imm)
    if (opc, ll) == (2, 0):
        return UNDEF                               # HLT: UNDEFINED while halting is disabled
    return unsupported("dcps")


def _system(w: int) -> Insn:
    read = bool((w >> 21) & 1)
    op0, op1 = (w >> 19) & 3, (w >> 16) & 7
    crn, crm, op2, rt = (w >> 12) & 15, (w >> 8) & 15, (w >> 5) & 7, w & 31
    if op0 == 0:
        if read:
            return unsupported("unallocated system instruction")
        if crn == 2:                               # hints
            hint = (crm << 3) | op2
            if hint in (0, 1, 4, 5):               # NOP, YIELD, SEV, SEVL
                return _PLAIN
            return unsupported({2: "wfe", 3: "wfi"}.get(hint, f"hint #{hint}"))
        if crn == 3 and op2 in (2, 4, 5, 6):       # CLREX, DSB, DMB, ISB
            return _PLAIN
        if crn == 4 and (op1, op2) in ((0, 5), (3, 6), (3, 7)):   # SPSel, DAIFSet, DAIFClr
            return _PLAIN
        return unsupported("pstate or barrier instruction")
    if op0 == 1:
        return unsupported("cache or TLB maintenance")
    if op0 == 2:
        if op1 == 0 and crn == 0 and op2 in DEBUG_REG_KINDS and crm < DEBUG_REG_COUNT:
            return Insn(InsnClass.DBGREG, write=not read, rt=rt, reg=f"{DEBUG_REG_KINDS[op2]}{crm}_el1")
        if (op1, crn, crm, op2) == (0, 0, 2, 2):
            return Insn(InsnClass.DBGREG, write=not read, rt=rt, reg="mdscr_el1")
        return unsupported("debug system register")
    native = NATIVE_SYSREGS.get((op1, crn, crm, op2))
    if native and (read or native[1]):
        return _PLAIN
    return unsupported(f"system register s3_{op1}_c{crn}_c{crm}_{op2}")


def _sext(value: int, bits: int) -> int:
    return value - (1 << bits) if value >> (bits - 1) else value


def address(w: int, reg, pc: int) -> int:
    """The address a load/store with a valid syndrome accesses (what the
    kernel reports in kvm_run.mmio).  `reg(n)` reads Xn, with n = 31 as SP
    for a base register."""
    size = w >> 30
    if (w & 0x3B000000) == 0x18000000:                        # literal
        return (pc + 4 * _sext((w >> 5) & 0x7FFFF, 19)) & MASK64
    base = reg((w >> 5) & 31)
    if (w & 0x3B000000) == 0x39000000:                        # unsigned offset, scaled
        return (base + (((w >> 10) & 0xFFF) << size)) & MASK64
    if (w & 0x3B200C00) == 0x38200800:                        # register offset
        option, shift = (w >> 13) & 7, size if (w >> 12) & 1 else 0
        m = (w >> 16) & 31
        off = 0 if m == 31 else reg(m)
        if option in (2, 6):                                  # UXTW, SXTW
            off &= 0xFFFFFFFF
            if option == 6:
                off = _sext(off, 32)
        elif option == 7:                                     # SXTX
            off = _sext(off & MASK64, 64)
        return (base + (off << shift)) & MASK64
    if (w & 0x3B200000) == 0x38000000:                        # unscaled / unprivileged
        return (base + _sext((w >> 12) & 0x1FF, 9)) & MASK64
    return base                                               # load-acquire / store-release

