"""A second, independent ideal stepper: QEMU's own software step inside Unicorn.

With EL2 enabled and MDCR_EL2.TDE set (as KVM sets it while debugging a
guest), MDSCR_EL1.SS = 1 and PSTATE.SS = 1, QEMU's implementation of the
Arm ARM's software step takes a step exception after every instruction.
Unicorn reports it to the interrupt hook (as QEMU's UDEF exception, with the
PC at the next instruction) and does not deliver it, so the hook re-arms
PSTATE.SS and the guest goes on.  Only exit-free programs can be stepped this
way (nothing here emulates MMIO, trapped registers or HVC); tests compare its
stop PCs with the reference's.

Programs with vectors may take exceptions to their EL1 and return with ERET.
Unicorn reports an SVC (EXCP_SWI) or a UDF (EXCP_UDEF, with the PC on the
instruction) and delivers neither (an FP trap it reports with the PC past the
instruction, as a step: such programs cannot be stepped here): the hook enters the vector as
the CPU would, clearing PSTATE.SS, and from there QEMU's state machine alone
decides where the next step exception comes (active-pending: at the vector,
before its first instruction) and what ERET does to the step.
"""
from __future__ import annotations

from unicorn import UC_ARCH_ARM64, UC_HOOK_INTR, UC_MODE_ARM, Uc
from unicorn import arm64_const as A

from .case import Case
from .guest import (DAIF, EL1_SYSREGS, PSTATE_RESET, PSTATE_SS, REG_IDS, VECTOR_OF, el1_below_el2, enter_el1,
                    program_bytes, syndrome, write_sysreg)
from .isa import EXCEPTIONS, Insn, InsnClass, decode

FAR_UNTIL = 0xFFFF_FFFF_FFFF_FFF0
EXCP_UDEF, EXCP_SWI = 1, 2


def arch_step_pcs(case: Case) -> list[int]:
    """Stop PCs of QEMU's architectural single-step over `case` (RAM only)."""
    uc = Uc(UC_ARCH_ARM64, UC_MODE_ARM)
    for r in case.memory:
        if r.kind == "ram":
            uc.mem_map(r.base, r.size)
    uc.mem_write(case.base, program_bytes(case))
    for addr, word in case.handler_words.items():
        uc.mem_write(addr, word.to_bytes(4, "little"))

    el1_below_el2(uc)
    write_sysreg(uc, 3, 4, 1, 1, 1, 1 << 8)            # MDCR_EL2: TDE, debug target EL2
    uc.reg_write(A.UC_ARM64_REG_PSTATE, PSTATE_RESET | PSTATE_SS)
    write_sysreg(uc, 3, 0, 1, 0, 2, 0)                 # CPACR_EL1: FP traps, like a fresh vCPU
    write_sysreg(uc, 2, 0, 0, 2, 2, 1)                 # MDSCR_EL1: SS (also rebuilds hflags)
    for name, value in case.regs:
        uc.reg_write(REG_IDS[name], value)
    for name, value in case.el1_regs:
        if name == "daif":
            uc.reg_write(A.UC_ARM64_REG_PSTATE, (PSTATE_RESET & ~DAIF) | value | PSTATE_SS)
        else:
            write_sysreg(uc, *EL1_SYSREGS[name], value)
    write_sysreg(uc, 2, 0, 0, 2, 2, 1)

    pcs: list[int] = []
    resumed = [case.base]           # where the guest went on after the last stop

    def take(uc: Uc, ret: int, insn: Insn) -> None:
        enter_el1(uc, ret, syndrome(insn))             # SS = 0: the step is active-pending at the vector
        uc.reg_write(A.UC_ARM64_REG_PC, case.vector(VECTOR_OF[insn.reason]))
        resumed[0] = -1

    def on_step(uc: Uc, intno: int, _data) -> None:
        pc = uc.reg_read(A.UC_ARM64_REG_PC)
        if intno == EXCP_SWI:                          # an SVC, PC past it
            take(uc, pc, decode(case.code_word(pc - 4)))
            return
        word = case.code_word(pc)
        insn = decode(word) if word is not None else None
        if (intno == EXCP_UDEF and insn is not None and insn.kind == InsnClass.GUEST_EXCEPTION
                and not EXCEPTIONS[insn.reason].retires and resumed[0] == pc):
            take(uc, pc, insn)                         # it did not retire (its step stop came first)
            return
        pcs.append(pc)
        resumed[0] = pc
        if pc == case.end or len(pcs) >= case.max_steps:
            uc.emu_stop()
            return
        pstate = uc.reg_read(A.UC_ARM64_REG_PSTATE)
        uc.reg_write(A.UC_ARM64_REG_PSTATE, pstate | PSTATE_SS)   # (DAIF and flags as the guest has them)
        write_sysreg(uc, 2, 0, 0, 2, 2, 1)

    uc.hook_add(UC_HOOK_INTR, on_step)
    uc.emu_start(case.base, FAR_UNTIL)
    return pcs
