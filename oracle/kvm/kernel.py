"""KVM's arm64 run loop, parameterised by an era policy.

One `Kvm` per run.  Its methods are named after the kernel functions whose
behaviour they model; the policy decides the few points where releases
differ (eras.py).  Return values of `ioctl_run` are what userspace sees.
"""
from __future__ import annotations

from ..trace import HSR_FAKED
from .eras import (FAKE_ALWAYS, FAKE_IF_PC_MOVED, FORCE, KEEP_PENDING, SKIP_DEFERRED,
                   SKIP_EL1_CLEAR, Era)
from .hardware import (DBGREG, ENDING, HVC, IRQ, MMIO, NO_SYNDROME, SOFTSTEP, STAGE2,
                       GuestHw, HwExit)

# ioctl_run results (what KVM_RUN returns to userspace)
EXIT_DEBUG, EXIT_MMIO, EINTR, ENOSYS, GUEST_ENDED = "debug", "mmio", "eintr", "enosys", "guest-ended"


class Kvm:
    def __init__(self, era: Era, hw: GuestHw):
        self.era, self.hw = era, hw
        self.exit_reason = "unknown"      # kvm_run->exit_reason, as left for userspace
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
        self.remembers_pending = era.entry_ss == KEEP_PENDING   # 6.1's DBG_SS_ACTIVE_PENDING
        if era.armed_at_enable:
            hw.ss = True                  # KVM_SET_GUEST_DEBUG arms the first step

    # ------------------------------------------------------------ KVM_RUN

    def ioctl_run(self, immediate_exit: bool = False, preempt: bool = False) -> str:
        hw = self.hw
        if self.exit_reason == "mmio" and self.mmio_return():
            if self.fake_step():
                self.signal = False       # delivered on the way back to userspace
                return EXIT_DEBUG
        # (the policy points below are called only where the era has them)
        if self.era.ss_at_load_put:
            self.vcpu_load()
        if immediate_exit:
            ret: int | str = EINTR        # exit_reason is left as it was
        else:
            ret = 1
            self.exit_reason = "unknown"
            while ret == 1:
                if self.signal:
                    self.signal = False
                    hw.why.append("signal")
                    self.exit_reason = "intr"
                    ret = EINTR
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
                ret = self.handle_exit(exit)
        # out:
        if self.increment_pc and self.era.commit_pc_at_out:
            self.adjust_pc()
        if self.era.ss_at_load_put:
            self.vcpu_put()
        self.signal = False               # delivered to the VMM on the way back to userspace
        return self.exit_reason if ret == 0 else ret  # type: ignore[return-value]

    # ------------------------------------------------------------ debug.c

    def setup_debug(self) -> None:
        if self.era.entry_ss == FORCE:
            self.hw.ss = True
        elif self.remembers_pending:
            self.hw.ss = not self.ss_active_pending

    def clear_debug(self) -> None:
        """6.1: an exit in active-pending is remembered (KEEP_PENDING eras only)."""
        if not self.hw.ss:
            self.ss_active_pending = True

    def vcpu_load(self) -> None:
        """6.14: SS restored from the host's record (ss_at_load_put eras only)."""
        self.hw.ss = not self.host_ss_active_pending

    def vcpu_put(self) -> None:
        """6.14: SS saved for the next load (ss_at_load_put eras only)."""
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
        if mode == FAKE_ALWAYS or (mode == FAKE_IF_PC_MOVED and self.hw.pc != self.hw.entry_pc):
            self.exit_reason = "debug"
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

    def handle_exit(self, exit: HwExit) -> int | str:
        kind = exit.kind
        if kind == ENDING:
            self.ending = exit.detail
            return GUEST_ENDED
        if self.signal_on_trap and exit.index in self.signal_on_trap:
            self.signal_on_trap.discard(exit.index)
            self.signal = True            # arrives while this exit is handled
        if kind == SOFTSTEP:
            return self.handle_guest_debug(exit)
        if kind == IRQ:
            return 1
        handled = self.handle_trap(exit)
        if handled == 1 and self.fake_step():
            return 0
        return handled

    def handle_guest_debug(self, exit: HwExit) -> int:
        self.exit_reason = "debug"
        self.hsr = exit.hsr
        if self.remembers_pending:
            self.ss_active_pending = False
        if self.era.step_exit_rearms:
            self.hw.ss = True
        return 0

    def handle_trap(self, exit: HwExit) -> int | str:
        hw, kind = self.hw, exit.kind
        if kind == STAGE2:
            hw.why.append(f"stage2-{exit.detail}")
            return 1                      # page mapped; the instruction runs again
        if kind == DBGREG:
            hw.why.append("dbgreg")
            hw.complete()
            self.skip_instr()
            return 1
        if kind == HVC:
            return 1                      # PSCI result in x0..x3; no skip
        if kind == NO_SYNDROME:
            self.ending = exit.detail
            return ENOSYS                 # io_mem_abort: no valid syndrome
        assert kind == MMIO and exit.access is not None
        kernel = exit.access.kernel
        hw.why.append("mmio-kernel" if kernel else "mmio")
        self.mmio_index, self.mmio_done = exit.index, False
        if self.era.mmio_skip_at_decode:  # decode_hsr() skipped before emulating
            self.mmio_done = True
            hw.complete()
            self.skip_instr()
        self.mmio_needed = True
        if kernel:                        # kvm_io_bus_* handled it: complete inline
            self.mmio_return()
            return 1
        self.exit_reason = "mmio"
        self.mmio_access = exit.access
        return 0
