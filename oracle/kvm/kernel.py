"""KVM's arm64 run loop, parameterised by an era policy.

One `Kvm` per run.  Its methods are named after the kernel functions whose
behaviour they model; the policy decides the few points where releases
differ (eras.py).  Return values of `ioctl_run` are what userspace sees.
"""
from __future__ import annotations

from ..trace import HSR_FAKED
from .eras import (FAKE_ALWAYS, FAKE_IF_PC_MOVED, FORCE, KEEP_PENDING, SKIP_DEFERRED,
                   SKIP_EL1_CLEAR, Era)
from .hardware import GuestHw, HwExit
from ..vocabulary import ExitReason, HwExitKind, RunResult, SmcAbi, Trap



class Kvm:
    def __init__(self, era: Era, hw: GuestHw):
        self.era, self.hw = era, hw
        hw.exec_faults = era.has("stage2-xn")
        self.exit_reason = ExitReason.UNKNOWN   # kvm_run->exit_reason, as left for userspace
        self.hsr = 0                      # kvm_run->debug.arch.hsr
        self.mmio_needed = False
        self.mmio_access = None           # kvm_run->mmio of the last userspace MMIO exit
        self.mmio_index = -1              # the instruction of the last data abort
        self.mmio_done = False            # ... already completed
        self.increment_pc = False         # 5.11+: PC increment pending for hyp
        self.ss_active_pending = False    # 6.1: DBG_SS_ACTIVE_PENDING
        self.host_ss_active_pending = False   # 6.14: HOST_SS_ACTIVE_PENDING
        self.signal = False               # a signal is pending for the vCPU thread
        self.signal_on_trap: set[int] = set()   # `trap` events: instruction indices
        self.ending = ""
        self.detail = ""                  # what the run ending says, for people
        self.trap_pc = hw.pc              # the PC when the last exit was handled (rfc-2018)
        self.remembers_pending = era.entry_ss == KEEP_PENDING   # 6.1's DBG_SS_ACTIVE_PENDING
        self.hypercall = ""               # kvm_run->hypercall of the last KVM_EXIT_HYPERCALL, for people
        # vcpu->guest_debug, as the VMM's first KVM_SET_GUEST_DEBUG leaves it
        self.enabled, self.singlestep, self.bps = True, True, frozenset()
        if era.armed_at_enable:
            hw.ss = True                  # KVM_SET_GUEST_DEBUG arms the first step

    # ------------------------------------------------------------ the VMM's ioctls

    def set_guest_debug(self, enable: bool, singlestep: bool, bps: frozenset[int]) -> None:
        """KVM_SET_GUEST_DEBUG (kvm_arch_vcpu_ioctl_set_guest_debug)."""
        was_stepping = self.enabled and self.singlestep
        self.enabled, self.singlestep = enable, enable and singlestep
        self.bps = bps if enable else frozenset()
        if not enable:                    # "if not enabled clear all flags"; a kept ENABLE keeps them
            self.ss_active_pending = self.host_ss_active_pending = False
        if self.era.armed_at_enable and self.singlestep and not was_stepping:
            self.hw.ss = True

    def set_one_reg(self, reg: str, value: int) -> None:
        """KVM_SET_ONE_REG of a core register: the value, nothing else."""
        self.hw.write(reg, value)

    def set_irq_line(self, line: str, level: int) -> None:
        """KVM_IRQ_LINE of the vCPU's own input (no vGIC): vcpu_interrupt_line()
        sets or clears HCR_EL2.VI/VF, which the hardware sees from the next
        entry on; nothing else of the step state changes.  An MMIO exit
        still open completes before that entry."""
        self.hw.write(line, level, pending=self.mmio_needed)

    # ------------------------------------------------------------ KVM_RUN

    def ioctl_run(self, immediate_exit: bool = False, preempt: bool = False) -> RunResult:
        hw = self.hw
        if self.exit_reason == ExitReason.MMIO and self.mmio_return():
            if self.fake_step():
                self.signal = False       # delivered on the way back to userspace
                return RunResult.DEBUG
        # (the policy points below are called only where the era has them)
        if self.era.ss_at_load_put:
            self.vcpu_load()
        if immediate_exit:
            result: RunResult | None = RunResult.EINTR   # exit_reason is left as it was
        else:
            result = None
            self.exit_reason = ExitReason.UNKNOWN
            while result is None:      # None: handled in the kernel, enter again
                if self.signal:
                    self.signal = False
                    hw.why.append("signal")
                    self.exit_reason = ExitReason.INTR
                    result = RunResult.EINTR
                    break
                if preempt:
                    preempt = False       # kvm_sched_out / kvm_sched_in before entry
                    if self.era.ss_at_load_put:
                        self.vcpu_put()
                        self.vcpu_load()
                self.setup_debug()
                if self.increment_pc:
                    self.adjust_pc()      # hyp's __adjust_pc, at the start of the world switch
                exit = hw.run()
                if self.remembers_pending:
                    self.clear_debug()
                result = self.handle_exit(exit)
        # out:
        if self.increment_pc and self.era.commit_pc_at_out:
            self.adjust_pc()
        if self.era.ss_at_load_put:
            self.vcpu_put()
        self.signal = False               # delivered to the VMM on the way back to userspace
        return result

    # ------------------------------------------------------------ debug.c

    def setup_debug(self) -> None:
        hw = self.hw
        # MDCR_EL2.TDE while any debugging is on; MDSCR_EL1.SS only while stepping
        hw.tde, hw.stepping, hw.bps = self.enabled, self.singlestep, self.bps
        if not self.singlestep:
            return
        if self.era.entry_ss == FORCE:
            hw.ss = True
        elif self.remembers_pending:
            hw.ss = not self.ss_active_pending

    def clear_debug(self) -> None:
        """6.1: an exit in active-pending is remembered (KEEP_PENDING eras only)."""
        if self.singlestep and not self.hw.ss:
            self.ss_active_pending = True

    def vcpu_load(self) -> None:
        """6.14: SS restored from the host's record (ss_at_load_put eras only)."""
        if self.singlestep:
            self.hw.ss = not self.host_ss_active_pending

    def vcpu_put(self) -> None:
        """6.14: SS saved for the next load; nothing while not stepping."""
        if self.singlestep:
            self.host_ss_active_pending = not self.hw.ss

    # ------------------------------------------------------------ emulation

    def skip_instr(self) -> None:
        """Advance the PC past an emulated instruction, as the era does it."""
        if self.era.skip == SKIP_DEFERRED:
            self.increment_pc = True
            return
        self.hw.skip()
        if self.era.skip == SKIP_EL1_CLEAR:
            self.hw.ss = False

    def adjust_pc(self) -> None:
        """Apply a pending PC increment (kvm_skip_instr in hyp: PC += 4, SS = 0)."""
        if self.increment_pc:
            self.increment_pc = False
            self.hw.skip()
            self.hw.ss = False

    def fake_step(self) -> bool:
        """4.15-era kvm_arm_handle_step_debug(): report a step although none was taken."""
        mode = self.era.fake_step
        if not self.singlestep:
            return False                  # only while KVM_GUESTDBG_SINGLESTEP is set
        if mode == FAKE_ALWAYS or (mode == FAKE_IF_PC_MOVED and self.hw.pc != self.trap_pc):
            self.exit_reason = ExitReason.DEBUG
            self.hsr = HSR_FAKED
            return True
        return False

    def mmio_return(self) -> bool:
        """kvm_handle_mmio_return(): complete a data abort (Rt written), skip the PC."""
        if self.era.mmio_guard and not self.mmio_needed:
            return False
        self.mmio_needed = False
        if not self.mmio_done:
            self.mmio_done = True
            self.hw.complete()
        if not self.era.mmio_skip_at_decode:
            self.skip_instr()
        return True

    # ------------------------------------------------------------ handle_exit.c

    # Each handler returns None when the exit was handled in the kernel and
    # the vCPU enters again, or what KVM_RUN returns to userspace.

    def handle_exit(self, exit: HwExit) -> RunResult | None:
        kind = exit.kind
        # The 2018 RFC samples *vcpu_pc() here, after the exit: an HVC has
        # already moved it past itself, so the RFC sees no change for it.
        self.trap_pc = self.hw.pc
        if kind == HwExitKind.ENDING:
            self.ending = exit.detail
            self.detail = self.hw.note or self.hw.log.detail
            return RunResult.GUEST_ENDED
        if self.signal_on_trap and exit.index in self.signal_on_trap:
            self.signal_on_trap.discard(exit.index)
            self.signal = True            # arrives while this exit is handled
        if kind in (HwExitKind.SOFTSTEP, HwExitKind.BRK, HwExitKind.BREAKPOINT):
            return self.handle_guest_debug(exit)
        if kind == HwExitKind.IRQ:
            return None
        result = self.handle_trap(exit)
        if result is None and self.fake_step():
            return RunResult.DEBUG
        return result

    def handle_guest_debug(self, exit: HwExit) -> RunResult:
        self.exit_reason = ExitReason.DEBUG
        self.hsr = exit.hsr
        if exit.kind == HwExitKind.SOFTSTEP:
            if self.remembers_pending:
                self.ss_active_pending = False
            if self.era.step_exit_rearms:
                self.hw.ss = True
        else:
            self.hw.why.append(exit.kind)     # a BRK or breakpoint: nothing to do with the step
        return RunResult.DEBUG

    def handle_trap(self, exit: HwExit) -> RunResult | None:
        hw, kind = self.hw, exit.kind
        if kind == HwExitKind.STAGE2:
            hw.why.append(Trap.STAGE2_DATA if exit.detail == "data" else Trap.STAGE2_FETCH)
            return None                   # page mapped; the instruction runs again
        if kind == HwExitKind.DBGREG:
            hw.why.append(Trap.DBGREG)
            hw.complete()
            self.skip_instr()
            return None
        if kind == HwExitKind.HVC:
            if exit.detail:               # no skip: HVC returns past itself
                return self.hypercall_exit("hvc")
            return None                   # PSCI result in x0..x3
        if kind == HwExitKind.SMC:
            return self.handle_smc(exit)
        if kind == HwExitKind.NO_SYNDROME:
            self.ending = exit.detail
            return RunResult.ENOSYS       # io_mem_abort: no valid syndrome
        assert kind == HwExitKind.MMIO and exit.access is not None
        kernel = exit.access.kernel
        hw.why.append(Trap.MMIO_KERNEL if kernel else Trap.MMIO)
        self.mmio_index, self.mmio_done = exit.index, False
        if self.era.mmio_skip_at_decode:  # decode_hsr() skipped before emulating
            self.mmio_done = True
            hw.complete()
            self.skip_instr()
        self.mmio_needed = True
        if kernel:                        # kvm_io_bus_* handled it: complete inline
            self.mmio_return()
            return None
        self.exit_reason = ExitReason.MMIO
        self.mmio_access = exit.access
        return RunResult.MMIO

    def handle_smc(self, exit: HwExit) -> RunResult | None:
        """handle_smc(): the era's SMC ABI (the result in x0 is the log's)."""
        self.hw.why.append(Trap.SMC)
        self.hw.complete()
        self.skip_instr()
        if self.era.smc_abi == SmcAbi.SMCCC and exit.detail:
            return self.hypercall_exit("smc")    # kvm_smccc_call_handler(): forwarded
        return None

    def hypercall_exit(self, insn: str) -> RunResult:
        """kvm_prepare_hypercall_exit(): the VMM answers it."""
        self.hw.why.append(Trap.HYPERCALL)
        self.exit_reason = ExitReason.HYPERCALL
        self.hypercall = insn
        return RunResult.HYPERCALL
