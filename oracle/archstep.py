"""A second, independent ideal stepper: QEMU's own software step inside Unicorn.

With EL2 enabled and MDCR_EL2.TDE set (as KVM sets it while debugging a
guest), MDSCR_EL1.SS = 1 and PSTATE.SS = 1, QEMU's implementation of the
Arm ARM's software step takes a step exception after every instruction.
Unicorn reports it to the interrupt hook (as QEMU's UDEF exception, with the
PC at the next instruction) and does not deliver it, so the hook re-arms
PSTATE.SS and the guest goes on.  Only exit-free programs can be stepped this
way (nothing here emulates MMIO, trapped registers or HVC); tests compare its
stop PCs with the reference's.
"""
from __future__ import annotations

from unicorn import UC_ARCH_ARM64, UC_HOOK_INTR, UC_MODE_ARM, Uc
from unicorn import arm64_const as A

from .case import Case
from .guest import PSTATE_RESET, REG_IDS, el1_below_el2, program_bytes, write_sysreg

PSTATE_SS = 1 << 21
FAR_UNTIL = 0xFFFF_FFFF_FFFF_FFF0


def arch_step_pcs(case: Case) -> list[int]:
    """Stop PCs of QEMU's architectural single-step over `case` (RAM only)."""
    uc = Uc(UC_ARCH_ARM64, UC_MODE_ARM)
    for r in case.memory:
        if r.kind == "ram":
            uc.mem_map(r.base, r.size)
    uc.mem_write(case.base, program_bytes(case))

    el1_below_el2(uc)
    write_sysreg(uc, 3, 4, 1, 1, 1, 1 << 8)            # MDCR_EL2: TDE, debug target EL2
    uc.reg_write(A.UC_ARM64_REG_PSTATE, PSTATE_RESET | PSTATE_SS)
    write_sysreg(uc, 2, 0, 0, 2, 2, 1)                 # MDSCR_EL1: SS (also rebuilds hflags)
    for name, value in case.regs:
        uc.reg_write(REG_IDS[name], value)

    pcs: list[int] = []

    def on_step(uc: Uc, intno: int, _data) -> None:
        pc = uc.reg_read(A.UC_ARM64_REG_PC)
        pcs.append(pc)
        if pc == case.end or len(pcs) >= case.max_steps:
            uc.emu_stop()
            return
        uc.reg_write(A.UC_ARM64_REG_PSTATE, PSTATE_RESET | PSTATE_SS)

    uc.hook_add(UC_HOOK_INTR, on_step)
    uc.emu_start(case.base, FAR_UNTIL)
    return pcs
