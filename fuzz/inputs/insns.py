"""AArch64 instruction encoders for the generator: words, never assembly text.

Each function returns one 32-bit word.  Registers are numbers (31 = xzr/sp
depending on the encoding).
"""
from __future__ import annotations

from stepfuzz.oracle.isa import B_SELF, NOP  # noqa: F401  (re-exported for the generator)


def _imm(value: int, bits: int) -> int:
    return value & ((1 << bits) - 1)


# ---- data processing
def add_imm(rd: int, rn: int, imm12: int, sub: bool = False, flags: bool = False) -> int:
    return 0x91000000 | (sub << 30) | (flags << 29) | (_imm(imm12, 12) << 10) | (rn << 5) | rd


def alu_reg(op: int, rd: int, rn: int, rm: int) -> int:
    """op: 0 add, 1 sub, 2 and, 3 orr, 4 eor, 5 adds, 6 subs, 7 ands."""
    base = (0x8B000000, 0xCB000000, 0x8A000000, 0xAA000000, 0xCA000000, 0xAB000000, 0xEB000000, 0xEA000000)[op & 7]
    return base | (rm << 16) | (rn << 5) | rd


def movz(rd: int, imm16: int, hw: int = 0, keep: bool = False) -> int:
    """MOVZ (or MOVK when keep) of a 16-bit chunk at bit 16*hw."""
    return (0xF2800000 if keep else 0xD2800000) | ((hw & 3) << 21) | (_imm(imm16, 16) << 5) | rd


def madd(rd: int, rn: int, rm: int, ra: int) -> int:
    return 0x9B000000 | (rm << 16) | (ra << 10) | (rn << 5) | rd


def csel(rd: int, rn: int, rm: int, cond: int) -> int:
    return 0x9A800000 | (rm << 16) | ((cond & 15) << 12) | (rn << 5) | rd


def ror_imm(rd: int, rn: int, shift: int) -> int:
    return 0x93C00000 | (rn << 16) | (_imm(shift, 6) << 10) | (rn << 5) | rd


# ---- branches (offsets in instructions)
def b(offset: int) -> int:
    return 0x14000000 | _imm(offset, 26)


def bl(offset: int) -> int:
    return 0x94000000 | _imm(offset, 26)


def b_cond(offset: int, cond: int) -> int:
    return 0x54000000 | (_imm(offset, 19) << 5) | (cond & 15)


def cbz(rt: int, offset: int, nonzero: bool = False) -> int:
    return (0xB5000000 if nonzero else 0xB4000000) | (_imm(offset, 19) << 5) | rt


def tbz(rt: int, bit: int, offset: int, nonzero: bool = False) -> int:
    return ((0x37000000 if nonzero else 0x36000000) | ((bit >> 5) << 31) | ((bit & 31) << 19)
            | (_imm(offset, 14) << 5) | rt)


def ret(rn: int = 30) -> int:
    return 0xD65F0000 | (rn << 5)


# ---- loads and stores
def ldst_uimm(size: int, opc: int, rt: int, rn: int, offset: int) -> int:
    """LDR/STR/LDRS* (unsigned offset); `offset` in bytes, scaled by the size."""
    return 0x39000000 | (size << 30) | (opc << 22) | (_imm(offset >> size, 12) << 10) | (rn << 5) | rt


def ldst_unscaled(size: int, opc: int, rt: int, rn: int, offset: int, mode: int = 0) -> int:
    """LDUR/STUR (mode 0), post-index (1), unprivileged (2), pre-index (3)."""
    return 0x38000000 | (size << 30) | (opc << 22) | (_imm(offset, 9) << 12) | (mode << 10) | (rn << 5) | rt


def ldst_reg(size: int, opc: int, rt: int, rn: int, rm: int) -> int:
    """LDR/STR (register offset, LSL #0)."""
    return 0x38206800 | (size << 30) | (opc << 22) | (rm << 16) | (rn << 5) | rt


def ldst_pair(load: bool, rt: int, rt2: int, rn: int, offset: int, mode: int = 2) -> int:
    """LDP/STP of X registers; mode 1 post-index, 2 offset, 3 pre-index."""
    return 0xA8000000 | (mode << 23) | (load << 22) | (_imm(offset >> 3, 7) << 15) | (rt2 << 10) | (rn << 5) | rt


def ldar(size: int, rt: int, rn: int, load: bool = True) -> int:
    """LDAR / STLR."""
    return 0x08808000 | (size << 30) | (load << 22) | (0x1F << 16) | (0x1F << 10) | (rn << 5) | rt


def ldxr(size: int, rt: int, rn: int) -> int:
    return 0x08400000 | (size << 30) | (0x1F << 16) | (0x1F << 10) | (rn << 5) | rt


def stxr(size: int, rs: int, rt: int, rn: int) -> int:
    return 0x08000000 | (size << 30) | (rs << 16) | (0x1F << 10) | (rn << 5) | rt


def ldr_literal(rt: int, offset: int) -> int:
    return 0x58000000 | (_imm(offset, 19) << 5) | rt


# ---- system
def debug_reg(read: bool, rt: int, kind: int, n: int) -> int:
    """MRS/MSR of DBGBVR/DBGBCR/DBGWVR/DBGWCR<n>_EL1 (kind 4..7 = op2)."""
    return 0xD5100000 | (read << 21) | (0 << 16) | (0 << 12) | ((n & 15) << 8) | ((kind & 7) << 5) | rt


def mdscr(read: bool, rt: int) -> int:
    return 0xD5100000 | (read << 21) | (2 << 8) | (2 << 5) | rt


def hvc(imm: int = 0) -> int:
    return 0xD4000002 | (_imm(imm, 16) << 5)


def smc(imm: int = 0) -> int:
    return 0xD4000003 | (_imm(imm, 16) << 5)


def brk(imm: int = 0) -> int:
    return 0xD4200000 | (_imm(imm, 16) << 5)


def svc(imm: int = 0) -> int:
    return 0xD4000001 | (_imm(imm, 16) << 5)


def udf(imm: int = 0) -> int:
    return imm & 0xFFFF


def hlt(imm: int = 0) -> int:
    return 0xD4400000 | (_imm(imm, 16) << 5)


ERET = 0xD69F03E0
FMOV_D0_X1 = 0x9E670020        # FP/SIMD: traps to the guest's EL1 while CPACR_EL1.FPEN = 0


def msr_daif(set_: bool, mask: int) -> int:
    """MSR DAIFSet/DAIFClr, #mask (D A I F = 8 4 2 1)."""
    return 0xD50340DF | ((mask & 15) << 8) | ((not set_) << 5)


# the EL1 exception registers, as (op0 op1 CRn CRm op2) in an MRS/MSR encoding
ELR_EL1, SPSR_EL1, ESR_EL1 = (3, 0, 4, 0, 1), (3, 0, 4, 0, 0), (3, 0, 5, 2, 0)


def mrs(rt: int, reg: tuple[int, int, int, int, int]) -> int:
    op0, op1, crn, crm, op2 = reg
    return 0xD5300000 | ((op0 & 1) << 19) | (op1 << 16) | (crn << 12) | (crm << 8) | (op2 << 5) | rt


def msr(reg: tuple[int, int, int, int, int], rt: int) -> int:
    return mrs(rt, reg) & ~(1 << 21)


def lsr_imm(rd: int, rn: int, shift: int) -> int:
    """LSR Xd, Xn, #shift (UBFM)."""
    return 0xD340FC00 | (shift << 16) | (rn << 5) | rd


def cmp_imm(rn: int, imm12: int) -> int:
    return 0xF100001F | (imm12 << 10) | (rn << 5)


def adr(rd: int, offset: int) -> int:
    """ADR Xd, . + 4 * offset."""
    imm = _imm(4 * offset, 21)
    return 0x10000000 | ((imm & 3) << 29) | ((imm >> 2) << 5) | rd
