"""The guest CPU: runs a case's program in Unicorn, as a KVM guest would run it.

`execute(case)` runs the program once in its ideal order and returns an
`ExecLog`: the PC of every instruction that completed, and for each one that
meets the hypervisor on the way (a stage-2 fault, an MMIO access, a trapped
debug register, an HVC) what it met.  Those instructions never run natively
in Unicorn: they are emulated here exactly as KVM emulates them (a loaded
MMIO value goes into Rt with the syndrome's sign-extension and width, HVC
returns the PSCI/SMCCC result), so the reference and every era model share
one definition of what each instruction does.

One Unicorn instance serves the whole process.  Guest physical addresses are
translated by a TLB-fill hook onto a fixed arena of Unicorn memory, so a new
case costs no mapping calls, and flushing the TLB per case makes "first touch
of a page" (a stage-2 fault) exactly "first TLB fill of that page".
"""
from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass, field
from functools import cached_property

import unicorn.unicorn_const as ucc
from unicorn import UC_ARCH_ARM64, UC_MODE_ARM, Uc, UcError
from unicorn import arm64_const as A

from .case import IPA_LIMIT, MAX_INSNS, MAX_RAM, PAGE, Case
from .isa import B_SELF, EXCEPTIONS, MASK64, Insn, InsnClass, address, aligned_access, decode
from .vocabulary import Meets, Outcome, SmcAbi

ARENA = 0x10_0000_0000            # Unicorn-physical home of all guest RAM but the code pages
ARENA_SIZE = MAX_RAM + 2 * PAGE
CODE_ARENA = 0x20_0000_0000       # ... and of the code pages: a slot per loaded case
CODE_SLOT = 8 * PAGE              # holds the pages of MAX_INSNS words and `b .` at any alignment, and the handlers'
CODE_SLOTS = 64                   # all translations are flushed once per round of slots
assert 2 * PAGE + 4 * (MAX_INSNS + 1) <= CODE_SLOT
SUBPAGE = 0x400                   # Unicorn's TLB granule on AArch64
TCG_BUFFER = 32 << 20             # Unicorn's translation buffer
PSTATE_RESET = 0x3C5
PSTATE_EL1H = 0x5                 # PSTATE.M: EL1 with SP_EL1, where the guest runs
PSTATE_NZCV = 0xF000_0000
PSTATE_SS = 1 << 21
EXCP_UDEF = 1                     # QEMU's exception numbers: UNDEFINED ...
EXCP_HVC = 11                     # ... and HVC
ESR_IL = 1 << 25                  # a 32-bit instruction
# ESR_EL1.ISS of an FP/SIMD trap as QEMU (the CPU the real kernels run on here) reports it: CV = 1, COND = 0xe
ISS_FP_TRAP = 0x1E00000
# where each kind of exception taken from EL1 with SP_EL1 enters (VBAR_EL1 + offset)
VECTOR_OF = {"svc": "sync", "undef": "sync", "fp": "sync", "alignment": "sync", "irq": "irq", "fiq": "fiq"}
DFSC_ALIGNMENT, ESR_WNR = 0x21, 1 << 6
LINE_MASKS = (("irq", 1 << 7), ("fiq", 1 << 6))   # each line and its PSTATE mask bit; IRQ first: the lines are virtual (HCR_EL2.VI/VF) and QEMU takes VIRQ before VFIQ
BUDGET_SLACK = 2                  # instructions run past max_steps, for models that overshoot

FETCH, READ, WRITE = ucc.UC_MEM_FETCH, ucc.UC_MEM_READ, ucc.UC_MEM_WRITE
RX = ucc.UC_PROT_READ | ucc.UC_PROT_EXEC
RW = ucc.UC_PROT_READ | ucc.UC_PROT_WRITE

# Run endings.  `end` and `max-steps` are normal; the others stop the run at
# an instruction both the reference and the models treat identically.

# PSCI / SMCCC as KVM answers them (the runner pins PSCI to v1.0 so every
# kernel answers alike).  Any other function id in these service ranges is
# implemented by some kernel with some effect -> not modelled.
PSCI_VERSION_1_0 = 0x10000
HVC_RESULTS = {0x84000000: PSCI_VERSION_1_0,     # PSCI_VERSION
               0x84000006: 2,                    # MIGRATE_INFO_TYPE: no trusted OS to migrate
               0x80000000: 0x10001}              # SMCCC_VERSION: 1.1
NOT_SUPPORTED = (1 << 64) - 1
KVM_HVC_RANGES = ((0x80000000, 0x8000FFFF), (0x84000000, 0x8400FFFF), (0xC4000000, 0xC400FFFF),
                  (0x86000000, 0x8600FFFF), (0xC6000000, 0xC600FFFF))

X_REGS = [A.UC_ARM64_REG_X0 + i for i in range(29)] + [A.UC_ARM64_REG_X29, A.UC_ARM64_REG_X30]
REG_IDS = dict(zip([f"x{i}" for i in range(31)], X_REGS)) | {"sp": A.UC_ARM64_REG_SP}
# the EL1 exception registers a case may set, as (op0, op1, CRn, CRm, op2)
EL1_SYSREGS = {"elr_el1": (3, 0, 4, 0, 1), "spsr_el1": (3, 0, 4, 0, 0),
               "esr_el1": (3, 0, 5, 2, 0), "far_el1": (3, 0, 6, 0, 0)}
CPACR_EL1 = (3, 0, 1, 0, 2)
DAIF = 0x3C0

Write = tuple[int, str, int]      # (instructions completed, register, value): a write from outside the guest
# A pseudo-register a model writes before a store-exclusive (ExecLog.with_monitor):
# the dynamic index of the guest's last entry from EL2, whose exception return
# cleared the exclusive monitor.  Without it a store-exclusive fails.
MONITOR_SINCE = "monitor-since"


@dataclass(frozen=True, slots=True)
class Emulation:
    """How the kernel emulates what the guest CPU emulates for it, where
    kernels differ (an era's: run.model_emulation; the reference's is the
    architecture's where a kernel was simply wrong: run.reference_emulation)."""
    smc_abi: str = SmcAbi.SMCCC       # handle_smc(): SmcAbi
    # kvm_handle_mmio_return(): a sign-extending load keeps its sign bits.
    # Before v7.2 (85f56708a443) vcpu_data_host_to_guest() cut the value back
    # to the access size after the extension: a zero-extended load.
    mmio_sign_extend: bool = True


IDEAL = Emulation()


def syndrome(insn: Insn) -> int:
    """ESR_EL1 of the exception a GUEST_EXCEPTION instruction takes."""
    iss = insn.imm if insn.reason == "svc" else ISS_FP_TRAP if insn.reason == "fp" else 0
    return (EXCEPTIONS[insn.reason].ec << 26) | ESR_IL | iss


def hvc_result(func: int) -> int | None:
    """x0 after an HVC #0 with function id `func` (low 32 bits of x0); None if not modelled."""
    func &= 0xFFFFFFFF
    if func in HVC_RESULTS:
        return HVC_RESULTS[func]
    if any(lo <= func <= hi for lo, hi in KVM_HVC_RANGES):
        return None
    return NOT_SUPPORTED


@dataclass(frozen=True, slots=True)
class Access:
    """A data access that left the guest: what KVM reports in kvm_run.mmio."""
    kernel: bool              # handled by an in-kernel device (mmio-kernel)
    write: bool
    addr: int
    size: int
    value: int                # the bytes on the bus (kvm_run.mmio.data), little-endian


@dataclass(frozen=True, slots=True)
class Special:
    """What one dynamic instruction meets besides running natively."""
    faults: tuple[str, ...] = ()      # stage-2 faults before it completes: "fetch" / "data"
    kind: str = Meets.NATIVE          # a Meets, or the Outcome of a run ending
    access: Access | None = None
    detail: str = ""

    @property
    def interrupt(self) -> bool:
        """The guest takes an IRQ or FIQ here, before the instruction starts."""
        return self.kind == Meets.EXCEPTION and self.detail in ("irq", "fiq")


@dataclass
class ExecLog:
    """The ideal execution of a case (see module doc)."""
    case: Case
    pcs: list[int]                    # pcs[i]: i-th instruction; pcs[n] = where the guest stopped
    specials: dict[int, Special]      # by dynamic index, including the index n of a run ending
    outcome: str                      # an Outcome
    detail: str = ""
    writes: tuple[Write, ...] = ()    # register writes from outside the guest ("pc": where it goes on)
    emulation: Emulation = IDEAL
    sign_extended: bool = False       # an MMIO load's sign extension changed its value
    irq_at_end: str | None = None     # an interrupt the guest would take at the end of its code
    _regs: dict[str, int] | None = field(default=None, repr=False)

    @cached_property
    def n(self) -> int:
        """Number of instructions that completed."""
        return len(self.pcs) - 1

    @cached_property
    def load_exclusive_pcs(self) -> frozenset[int]:
        """Addresses of the case's load-exclusive instructions (their step syndrome says so)."""
        case = self.case
        return frozenset(case.base + 4 * i for i, w in enumerate(case.words) if decode(w).load_exclusive)

    @cached_property
    def store_exclusive_pcs(self) -> frozenset[int]:
        case = self.case
        return frozenset(case.base + 4 * i for i, w in enumerate(case.words)
                         if decode(w).kind == InsnClass.STORE_EXCLUSIVE)

    def with_monitor(self, idx: int, entered: int) -> "ExecLog":
        """The execution where the store-exclusive at dynamic index `idx` (if
        it is one) meets the exclusive monitor as the guest's last entry,
        before instruction `entered`, left it: every exception return from EL2
        clears it, so under stepping every store-exclusive fails, and one that
        runs free after its load-exclusive, with no exit between, succeeds.
        A model calls this where stepping is off."""
        if idx >= self.n or self.pcs[idx] not in self.store_exclusive_pcs:
            return self
        write = (idx, MONITOR_SINCE, entered)
        if [w for w in self.writes if w[:2] == write[:2]][-1:] == [write]:
            return self
        return self.again(write)

    def final_regs(self) -> dict[str, int]:
        """x0-x30 and sp when the run ended (re-executes the case: rarely needed)."""
        if self._regs is None:
            self._regs = machine().run(self.case, self.writes, self.emulation, want_regs=True)._regs
        return self._regs

    def again(self, *writes: Write) -> "ExecLog":
        """The same execution with more writes from outside: where a VMM or a
        kernel changes the guest's registers, or a model takes the guest off
        its ideal path."""
        return machine().run(self.case, self.writes + writes, self.emulation)


def execute(case: Case, writes: tuple[Write, ...] = (), emulation: Emulation = IDEAL) -> ExecLog:
    """Run `case` in its ideal order.  Each write (i, reg, value) sets `reg`
    once i instructions have completed (`pc`: execution goes on there)."""
    return machine().run(case, writes, emulation)


def forget_code() -> None:
    """Load the next case as fresh code, even if it is the last one again
    (benchmarks: what a campaign's next input costs, translation included)."""
    machine().case = None


_MACHINE: "Machine | None" = None


def machine() -> "Machine":
    global _MACHINE
    if _MACHINE is None:
        _MACHINE = Machine()
    return _MACHINE


class _Regs:
    """Register access (and the per-case controls) through Unicorn's C API:
    the Python binding's own wrappers cost several microseconds per call."""

    def __init__(self, uc: Uc):
        from unicorn.unicorn_py3.unicorn import uclib
        self._val = ctypes.c_uint64()
        self._ptr = ctypes.cast(ctypes.pointer(self._val), ctypes.c_void_p)
        self._uch, self._read, self._write = uc._uch, uclib.uc_reg_read, uclib.uc_reg_write
        self._ctl = uclib.uc_ctl
        # uc_ctl codes: (UC_CTL_IO_WRITE << 30) | (number of arguments << 26) | control
        self._flush_tb = (ucc.UC_CTL_IO_WRITE << 30) | ucc.UC_CTL_TB_FLUSH
        self._flush_tlb = (ucc.UC_CTL_IO_WRITE << 30) | ucc.UC_CTL_TLB_FLUSH

    def flush_tb(self) -> None:
        self._ctl(self._uch, self._flush_tb)

    def flush_tlb(self) -> None:
        self._ctl(self._uch, self._flush_tlb)

    def __getitem__(self, reg: int) -> int:
        self._read(self._uch, reg, self._ptr)
        return self._val.value

    def __setitem__(self, reg: int, value: int) -> None:
        self._val.value = value
        self._write(self._uch, reg, self._ptr)


def program_bytes(case: Case) -> bytes:
    """The case's code as the guest sees it in memory: its words, then `b .`."""
    return struct.pack(f"<{len(case.words) + 1}I", *case.words, B_SELF)


def write_sysreg(uc: Uc, op0: int, op1: int, crn: int, crm: int, op2: int, value: int) -> None:
    uc.reg_write(A.UC_ARM64_REG_CP_REG, (crn, crm, op0, op1, op2, value))


def read_sysreg(uc: Uc, op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
    return uc.reg_read(A.UC_ARM64_REG_CP_REG, (crn, crm, op0, op1, op2))


def set_pstate(uc: Uc, value: int) -> None:
    """Write PSTATE so that Unicorn sees it: any system register write
    rebuilds its hflags (CPACR_EL1 is written back unchanged)."""
    uc.reg_write(A.UC_ARM64_REG_PSTATE, value)
    write_sysreg(uc, *CPACR_EL1, read_sysreg(uc, *CPACR_EL1))


def enter_el1(uc: Uc, ret: int, esr: int | None) -> None:
    """Exception entry to EL1 with SP_EL1, as the CPU does it (Unicorn never
    does: QEMU's arm_cpu_do_interrupt_aarch64 is the model): ELR_EL1 = `ret`,
    SPSR_EL1 = the PSTATE it interrupts, ESR_EL1 = `esr` (None: an
    interrupt, unchanged), then all of DAIF masked, EL1h, flags clear and SS
    = 0 (as QEMU and KVM's enter_exception64 build it).  The caller moves
    the PC to the vector."""
    pstate = uc.reg_read(A.UC_ARM64_REG_PSTATE)
    uc.reg_write(A.UC_ARM64_REG_ELR_EL1, ret)
    write_sysreg(uc, *EL1_SYSREGS["spsr_el1"], pstate & (PSTATE_NZCV | DAIF | 0xF))
    if esr is not None:
        uc.reg_write(A.UC_ARM64_REG_ESR_EL1, esr)
    set_pstate(uc, DAIF | PSTATE_EL1H)


def el1_below_el2(uc: Uc) -> None:
    """Make EL1 a proper AArch64 non-secure EL below an EL2 (Unicorn resets
    SCR_EL3 and HCR_EL2 to 0)."""
    write_sysreg(uc, 3, 6, 1, 1, 0, (1 << 10) | (1 << 8) | 1)   # SCR_EL3: RW | HCE | NS
    write_sysreg(uc, 3, 4, 1, 1, 0, 1 << 31)                     # HCR_EL2: RW


class Machine:
    """The process's one Unicorn CPU plus the per-run bookkeeping of its hooks.

    Most instructions run natively inside one emu_start.  Trapped debug
    registers and HVC are emulated inside Unicorn's hooks as they execute;
    MMIO accesses stop emulation (the TLB refuses the page) and are emulated
    here before it resumes; instructions not modelled are exit addresses, so
    emulation stops before them.
    """

    def __init__(self) -> None:
        uc = self.uc = Uc(UC_ARCH_ARM64, UC_MODE_ARM)
        # Translations are flushed every CODE_SLOTS cases (see _load), so they
        # never need much of Unicorn's default 1 GiB buffer; a small one caps
        # RSS whatever happens (when it is full, Unicorn flushes it).
        uc.ctl_set_tcg_buffer_size(TCG_BUFFER)
        self.regs = _Regs(uc)
        uc.ctl_set_tlb_mode(ucc.UC_TLB_VIRTUAL)
        uc.mem_map(ARENA, ARENA_SIZE)
        uc.mem_map(CODE_ARENA, CODE_SLOT * CODE_SLOTS)
        # FP/SIMD left disabled, like a fresh vCPU
        el1_below_el2(uc)
        write_sysreg(uc, 3, 0, 1, 0, 2, 0)                      # CPACR_EL1: FP traps
        # A vCPU starts with PSTATE 0x3c5 (EL1h, DAIF masked, NZCV clear);
        # Unicorn's reset also sets Z.
        uc.reg_write(A.UC_ARM64_REG_PSTATE, PSTATE_RESET)
        write_sysreg(uc, 3, 0, 1, 0, 2, 0)                      # (a system register write rebuilds hflags)
        self.reset_context = uc.context_save()
        uc.hook_add(ucc.UC_HOOK_TLB_FILL, self._on_tlb_fill)
        uc.hook_add(ucc.UC_HOOK_BLOCK, self._on_block)
        uc.hook_add(ucc.UC_HOOK_INTR, self._on_intr)
        for insn in (A.UC_ARM64_INS_MRS, A.UC_ARM64_INS_MSR):
            uc.hook_add(ucc.UC_HOOK_INSN, self._on_sysreg, None, 1, 0, insn)
        uc.ctl_exits_enabled(True)
        self.dirty: set[int] = set()          # arena subpages the last run may have written
        self.case: Case | None = None
        self.slot = -1                        # the code slot of self.case
        self.exits: list[int] | None = None
        self.page_exits: frozenset[int] = frozenset()
        self.fault: tuple[int, int] | None = None
        self.code_pages: dict[int, int] = {}
        self.stale_pages: dict[int, int] = {}   # the last case's code pages, while Unicorn may look them up
        self.aligned_hooks: list[int] = []

    # ------------------------------------------------------------ layout

    def _load(self, case: Case) -> None:
        uc = self.uc
        last, self.case = self.case, case
        self.ram: list[tuple[int, int, int, bool]] = []      # (base, end, arena offset, prefault)
        off = 0
        for r in case.memory:
            if r.kind == "ram":
                self.ram.append((r.base, r.end, off, r.prefault))
                off += r.size
        self.devices = [(r.base, r.end, r.kind == "mmio-kernel") for r in case.memory if r.kind != "ram"]
        zero = bytes(SUBPAGE)
        for sub in self.dirty:
            uc.mem_write(sub, zero)
        self.dirty = set()
        if (last is None or last.base != case.base or last.words != case.words
                or last.handler_words != case.handler_words):
            # Unicorn invalidates the translations at the old exits when the
            # next run starts, and looks their pages up to do it: until
            # then those pages still fetch from the old slot (not a fault of
            # the new case; a jump there is still stopped by the block hook)
            old = {page: self._code_phys(page) for page in self.code_pages}
            first = case.base & ~(PAGE - 1)
            pages = list(range(first, (case.end + 4 + PAGE - 1) & ~(PAGE - 1), PAGE))
            pages += sorted({a & ~(PAGE - 1) for a in case.handler_words} - set(pages))
            self.code_pages = {page: i for i, page in enumerate(pages)}   # page -> its place in the slot
            self.stale_pages = {page: phys for page, phys in old.items() if page not in self.code_pages}
            self._new_code_slot(case)
            stops = case.pcs_where(lambda w: decode(w).stops)
            # accesses that must be aligned are checked, and the exclusive
            # monitor sees each load-exclusive's address, as they run
            for hook in self.aligned_hooks:
                uc.hook_del(hook)
            self.aligned_hooks = [uc.hook_add(ucc.UC_HOOK_CODE, self._on_aligned_access, None, a, a)
                                  for a in case.pcs_where(aligned_access)]
            # An exit address on the first word of a page makes Unicorn probe
            # a fetch below that page when a run ends elsewhere; a block always
            # starts there (no translation crosses a page), so the block hook
            # stops before such a word instead.
            self.page_exits = frozenset(a for a in stops if not a & (PAGE - 1))
            exits = [case.end] + [a for a in stops if a & (PAGE - 1)]
            if exits != self.exits:
                uc.ctl_set_exits(exits)
                self.exits = exits
        # (the same code again -- a model re-running a case on its own path --
        # keeps its slot, its translations and its exits)
        self.regs.flush_tlb()

    def _new_code_slot(self, case: Case) -> None:
        """Write the code pages of `case` into the next slot.

        Translations are looked up by physical address, so code in a slot
        never used since the last flush cannot meet a translation of other
        code: no flush per case (one costs 10-30 µs).  A slot is reused only
        after a flush of every translation.  (Flushing just the code range
        was tried once and was not enough: a campaign ran stale code past a
        case's end.)"""
        self.slot = (self.slot + 1) % CODE_SLOTS
        if self.slot == 0:
            self.regs.flush_tb()
        image = bytearray(len(self.code_pages) * PAGE)
        at = case.base & (PAGE - 1)          # (the code's first page is the slot's first)
        code = program_bytes(case)
        image[at:at + len(code)] = code
        for addr, w in case.handler_words.items():
            at = self._code_phys(addr) - self._code_phys(case.base & ~(PAGE - 1))
            image[at:at + 4] = w.to_bytes(4, "little")
        self.uc.mem_write(self._code_phys(case.base & ~(PAGE - 1)), bytes(image))

    def _code_phys(self, addr: int) -> int:
        return (CODE_ARENA + self.slot * CODE_SLOT + self.code_pages[addr & ~(PAGE - 1)] * PAGE
                + (addr & (PAGE - 1)))

    # ------------------------------------------------------------ hooks

    def _on_tlb_fill(self, uc: Uc, vaddr: int, access: int, entry, _data) -> bool:
        if access == FETCH and self.stale_pages:
            phys = self.stale_pages.get(vaddr & ~(PAGE - 1))
            if phys is not None:
                entry.paddr = phys + (vaddr & (PAGE - 1) & ~(SUBPAGE - 1))
                entry.perms = RX
                return True
        for base, end, off, prefault in self.ram:
            if base <= vaddr < end:
                break
        else:
            return self._refuse(vaddr, access)
        page = vaddr & ~(PAGE - 1)
        code_page = page in self.code_pages
        # Code pages are read/execute only, so a store into one is seen here;
        # nothing else may be executed.
        if (access == WRITE and code_page) or (access == FETCH and not code_page):
            return self._refuse(vaddr, access)
        perms = RX
        if not prefault and page not in self.executable:
            if access == FETCH and self.regs[A.UC_ARM64_REG_PC] & ~(PAGE - 1) != page:
                # Unicorn looking up an exit on a page the guest has not run
                # yet: no touch, and the entry is dropped after this run
                self.probed = True
            elif access == FETCH:
                self._first_fetch(page)
            else:
                if page not in self.touched:
                    self.touched.add(page)     # first touch: KVM takes a stage-2 fault
                    self._fault_at(self._index(), "data")
                perms = ucc.UC_PROT_READ       # (so that a fetch from it fills again)
        if code_page:
            entry.paddr = self._code_phys(vaddr & ~(SUBPAGE - 1))
            entry.perms = perms
            return True
        sub = ARENA + off + ((vaddr - base) & ~(SUBPAGE - 1))
        entry.paddr = sub
        if access == WRITE:
            self.dirty.add(sub)
            entry.perms = RW
        else:
            # read-only until written: the first store fills again, so the
            # subpage is known dirty and zeroed before the next run (a store
            # through an entry a load made was missed, and the next run of
            # the case read what this one wrote)
            entry.perms = ucc.UC_PROT_READ
        return True

    def _refuse(self, vaddr: int, access: int) -> bool:
        # Only the first refusal of a run counts: Unicorn probes an exception
        # vector after it, which means nothing here.
        if self.fault is None:
            self.fault = (vaddr, access)
        return False

    def _on_block(self, uc: Uc, addr: int, size: int, _data) -> None:
        case = self.case
        if not case.base <= addr < case.end and addr not in case.handler_words:
            # A branch left the code (into the rest of a code page).  Stop
            # before this block runs; nothing in it counts.
            self._ending(addr, Outcome.LEFT_CODE, f"branched to {addr:#x}")
            uc.emu_stop()
            return
        if self.retired >= self.budget:
            self._ending(addr, Outcome.MAX_STEPS, "")
            uc.emu_stop()
            return
        if addr in self.page_exits:
            uc.emu_stop()                 # before a word that cannot run natively (see _load)
            return
        self.block_pc, self.block_retired = addr, self.retired
        self.segments.append([addr, size >> 2])
        self.retired += size >> 2

    def _on_sysreg(self, uc: Uc, reg: int, cp, _data) -> int:
        """MRS/MSR as they execute: debug registers trap to KVM, which keeps
        the guest's values in a shadow (reset 0, stored verbatim)."""
        pc = self.regs[A.UC_ARM64_REG_PC]
        insn = decode(self._word(pc))
        if insn.kind != InsnClass.DBGREG:
            return 0                       # an allowed native register
        if insn.write:
            self.dbgregs[insn.reg] = cp.val
        else:
            value = self.dbgregs.get(insn.reg, 0)
            if insn.rt != 31:
                self.regs[X_REGS[insn.rt]] = value
        self.specials[self._index(pc)] = Special(kind=Meets.DBGREG, detail=insn.reg)
        return 1                           # skip: emulated

    def _on_intr(self, uc: Uc, intno: int, _data) -> None:
        pc = self.regs[A.UC_ARM64_REG_PC]
        if intno == EXCP_HVC and self.outcome is None:
            pc -= 4                        # Unicorn reports HVC with the return address
            func = self.regs[A.UC_ARM64_REG_X0]
            imm = decode(self._word(pc)).imm
            if imm == 0 and self.case.forwards(func):
                # KVM_EXIT_HYPERCALL; the VMM answers in x0 (KVM_SET_ONE_REG)
                self.regs[X_REGS[0]] = self.case.hypercall_result
                self.specials[self._index(pc)] = Special(kind=Meets.HVC_FORWARDED, detail=f"{func & 0xFFFFFFFF:#x}")
                return
            result = hvc_result(func) if imm == 0 else None
            if result is not None:
                for reg, value in zip(X_REGS[:4], (result, 0, 0, 0)):
                    self.regs[reg] = value     # SMCCC: results in x0-x3
                self.specials[self._index(pc)] = Special(kind=Meets.HVC, detail=f"{func & 0xFFFFFFFF:#x}")
                return
            self._cut(pc)
            self._ending(pc, Outcome.UNSUPPORTED, f"hvc #{imm} with function {func & 0xFFFFFFFF:#x} is not modelled")
        elif self.outcome is None:
            self._cut(pc)
            if intno == EXCP_UDEF and self.case.code_word(pc) is None:
                # the zeros after a handler (UDF #0): it ran off its end
                self._ending(pc, Outcome.LEFT_CODE, f"ran past the end of a handler, to {pc:#x}")
            elif intno == EXCP_UDEF and self.case.vectors is not None:
                # decoded as ordinary, yet Unicorn's Cortex-A72 has no such
                # instruction: QEMU's `max` CPU (the real kernels') may
                self._ending(pc, Outcome.UNSUPPORTED, f"{self._word(pc):#010x} at {pc:#x} is not an instruction "
                             "of the guest CPU (Cortex-A72); the real one may have it")
            else:
                self._exception(pc, f"exception {intno} at {pc:#x}")
        uc.emu_stop()

    def _exception(self, pc: int, detail: str) -> None:
        """An exception not modelled (an abort at EL1, Unicorn's own UNDEF):
        the run ends there."""
        if self.case.vectors is not None:
            self._ending(pc, Outcome.UNSUPPORTED, f"{detail}: not modelled yet")
        else:
            self._ending(pc, Outcome.GUEST_EXCEPTION, detail)

    def _take(self, pc: int, which: str, esr: int | None = None) -> int:
        """Exception entry to the guest's EL1, as the CPU does it (Unicorn
        never does: QEMU's arm_cpu_do_interrupt_aarch64 is the model).  The
        instruction at `pc` takes it (an SVC completes first); returns the
        vector.  Without `vectors` the run ends there, as a guest exception."""
        case = self.case
        if case.vectors is None:
            self._ending(pc, Outcome.GUEST_EXCEPTION, f"{which} at {pc:#x}")
            return pc
        if self.regs[A.UC_ARM64_REG_PSTATE] & 0xF != PSTATE_EL1H:
            # (the vector would be VBAR + 0x000..0x180, and the SP banks switch)
            self._ending(pc, Outcome.UNSUPPORTED, f"{which} taken with SP_EL0 selected is not modelled")
            return pc
        # (Unicorn's VBAR_EL1 stays 0, outside any case's code: given a real
        # vector, Unicorn delivers its own exceptions there, e.g. the data
        # abort of an MMIO access it stops at, and the next run inherits it.)
        retires = which in EXCEPTIONS and EXCEPTIONS[which].retires
        enter_el1(self.uc, pc + 4 if retires else pc, esr)
        return self._complete(pc, Special(kind=Meets.SVC if retires else Meets.EXCEPTION, detail=which),
                              case.vector(VECTOR_OF[which]))

    def _eret(self, pc: int) -> int:
        """ERET at EL1: back to ELR_EL1 with SPSR_EL1's PSTATE (to EL1h only)."""
        uc, regs = self.uc, self.regs
        spsr, elr = read_sysreg(uc, *EL1_SYSREGS["spsr_el1"]), regs[A.UC_ARM64_REG_ELR_EL1]
        if spsr & ~(PSTATE_NZCV | DAIF | 0xF | PSTATE_SS) or spsr & 0xF != PSTATE_EL1H:
            self._ending(pc, Outcome.UNSUPPORTED, f"eret with SPSR_EL1 {spsr:#x}: "
                         "a return to anything but EL1h with NZCV and DAIF is not modelled")
            return pc
        if elr & 3:
            self._ending(pc, Outcome.UNSUPPORTED, f"eret to the misaligned {elr:#x} is not modelled")
            return pc
        set_pstate(uc, spsr & ~PSTATE_SS)
        self.monitor = None               # an exception return clears the local monitor
        return self._complete(pc, None, elr)

    def _interrupt(self) -> str | None:
        """The interrupt the guest takes before its next instruction, if any."""
        if self.lines:
            pstate = self.regs[A.UC_ARM64_REG_PSTATE]
            for line, mask in LINE_MASKS:
                if self.lines.get(line) and not pstate & mask:
                    return line
        return None

    # ------------------------------------------------------------ bookkeeping

    def _index(self, pc: int | None = None) -> int:
        """Dynamic index of the instruction at `pc` in the current block."""
        if pc is None:
            pc = self.regs[A.UC_ARM64_REG_PC]
        return self.block_retired + ((pc - self.block_pc) >> 2)

    def _fault_at(self, index: int, kind: str) -> None:
        """A stage-2 fault ("fetch", "exec" or "data") before instruction `index` completes."""
        self.faults.setdefault(index, []).append(kind)

    def _cut(self, pc: int) -> None:
        """The current block stopped before `pc`: instructions from pc on did not complete."""
        if self.segments:
            seg = self.segments[-1]
            if seg[0] <= pc < seg[0] + 4 * seg[1]:
                done = (pc - seg[0]) >> 2
                self.retired -= seg[1] - done
                seg[1] = done

    def _ending(self, pc: int, outcome: str, detail: str) -> None:
        if self.outcome is None:
            self.outcome, self.detail, self.stop_pc = outcome, detail, pc

    def _complete(self, pc: int, special: Special | None, nxt: int | None = None) -> int:
        """An instruction completed outside Unicorn (emulated): count it, go
        on after it (or at `nxt`)."""
        if special is not None:
            self.specials[self.retired] = special
        self.segments.append([pc, 1])
        self.retired += 1
        return pc + 4 if nxt is None else nxt

    # ------------------------------------------------------------ running

    def run(self, case: Case, writes: tuple[Write, ...] = (), emulation: Emulation = IDEAL,
            want_regs: bool = False) -> ExecLog:
        uc, regs = self.uc, self.regs
        self._load(case)
        uc.context_restore(self.reset_context)
        for name, value in case.regs:
            regs[REG_IDS[name]] = value
        if case.el1_regs:
            self._el1_regs(case)
        self.lines: dict[str, int] = {}       # interrupt lines the VMM drives (KVM_IRQ_LINE)
        self.emulation = emulation
        self.sign_extended = False
        self.irq_at_end = None
        self.touched: set[int] = set()        # pages mapped at stage 2 ...
        self.executable: set[int] = set()     # ... and of them, mapped executable
        self.probed = False
        self.faults: dict[int, list[str]] = {}
        self.specials: dict[int, Special] = {}
        self.segments: list[list[int]] = []
        self.retired = self.block_retired = 0
        self.block_pc = case.base
        self.budget = case.max_steps + BUDGET_SLACK
        self.outcome: str | None = None
        self.detail, self.stop_pc = "", case.base
        self.dbgregs: dict[str, int] = {}
        self.monitor: tuple[int, int, int] | None = None    # the last load-exclusive: (index, address, size)
        self.monitor_since: int | None = None               # MONITOR_SINCE for the next store-exclusive
        self.misaligned: tuple[int, int] | None = None      # (pc, address) of an access stopped before it faults
        pending: dict[int, list[tuple[str, int]]] = {}
        for i, reg, value in writes:
            pending.setdefault(i, []).append((reg, value))
        pc = case.base
        while self.outcome is None:
            if self.retired in pending:
                pc = self._apply(pending.pop(self.retired), pc)
            if pc == case.end:
                self.irq_at_end = self._interrupt()
                self._ending(pc, Outcome.END, "")
                break
            self.fault = None
            line = self._interrupt()
            word = case.code_word(pc)
            stops = word is not None and decode(word).stops
            if (line is not None or stops) and self.retired >= self.budget:
                # (the bound the block hook keeps for Unicorn, kept here too:
                # an ERET to itself or an exception in a handler loops here)
                self._ending(pc, Outcome.MAX_STEPS, "")
                break
            if line is not None:
                pc = self._take(pc, line)
                continue
            if stops:
                # Unicorn does not stop at an exit it starts on: handle it here
                self._fetched(pc)
                pc = self._on_exit(pc)
                continue
            # With a write to come, stop exactly where it applies; with an
            # interrupt line up but masked, after every instruction (one may
            # unmask it).  Unicorn counts instructions only in blocks
            # translated while counting, so translations are flushed around
            # a counted run (only then).
            count = min(pending) - self.retired if pending else 0
            if any(self.lines.values()):
                count = 1
            if count > 0:
                self.regs.flush_tb()
            before = self.retired
            try:
                uc.emu_start(pc, 0, count=count) if count > 0 else uc.emu_start(pc, 0)
            except UcError as e:
                pc = regs[A.UC_ARM64_REG_PC]
                self._cut(pc)
                pc = self._on_fault(pc, e)
            else:
                if self.outcome is not None:
                    break
                pc = regs[A.UC_ARM64_REG_PC]
                self._cut(pc)
                if self.retired >= self.budget and pc != case.end:
                    self._ending(pc, Outcome.MAX_STEPS, "")
                    break
                if pc != case.end and not (count > 0 and self.retired == before + count):
                    pc = self._on_exit(pc)
            finally:
                if count > 0:
                    self.regs.flush_tb()
                if self.probed:
                    self.probed = False
                    self.regs.flush_tlb()
        return self._log(case, writes, want_regs)

    def _first_fetch(self, page: int) -> None:
        """The guest's first instruction fetch from `page`, not prefaulted: a
        stage-2 fault.  KVM maps a page executable only on an instruction
        fault, on a CPU without CTR_EL0.DIC (QEMU's `max`, the Cortex-A72):
        a page read first faults again ("exec"; eras.FEATURES "stage2-xn")."""
        self._fault_at(self.retired, "exec" if page in self.touched else "fetch")
        self.touched.add(page)
        self.executable.add(page)

    def _fetched(self, pc: int) -> None:
        """The instruction at `pc` is fetched outside Unicorn: its first
        fetch from a page still takes the fault the TLB hook would record."""
        page = pc & ~(PAGE - 1)
        if page not in self.executable and not any(b <= pc < e and pre for b, e, _, pre in self.ram):
            self._first_fetch(page)

    def _apply(self, writes: list[tuple[str, int]], pc: int) -> int:
        """Registers written from outside the guest; returns where it goes on."""
        for reg, value in writes:
            if reg == "pc":
                pc = value
            elif reg in ("irq", "fiq"):
                self.lines[reg] = value
            elif reg == MONITOR_SINCE:
                self.monitor_since = value
            elif reg == "daif":
                pstate = self.regs[A.UC_ARM64_REG_PSTATE]
                self.regs[A.UC_ARM64_REG_PSTATE] = (pstate & ~DAIF) | value
            else:
                self.regs[REG_IDS[reg]] = value
        return pc

    def _el1_regs(self, case: Case) -> None:
        for name, value in case.el1_regs:
            if name == "daif":
                self.regs[A.UC_ARM64_REG_PSTATE] = (PSTATE_RESET & ~DAIF) | value
            else:
                write_sysreg(self.uc, *EL1_SYSREGS[name], value)

    def _on_fault(self, pc: int, err: UcError) -> int:
        """Emulation stopped on a TLB refusal at `pc`: MMIO, or leaving guest memory."""
        if self.fault is None:
            self._exception(pc, f"{err} at {pc:#x}")
            return pc
        addr, access = self.fault
        if access == FETCH:
            self._ending(pc, Outcome.LEFT_CODE, f"instruction fetch from {addr:#x}, which is not code")
            return pc
        if access == WRITE and (addr & ~(PAGE - 1)) in self.code_pages:
            self._ending(pc, Outcome.UNSUPPORTED, f"store to {addr:#x}, a page that holds code")
            return pc
        word = self._word(pc)
        insn = decode(word)
        if insn.kind == InsnClass.MEM and insn.iss:
            # the TLB reports the page; KVM reports the address accessed
            addr = address(word, self._base_reg, pc)
        if addr >= IPA_LIMIT:
            self._exception(pc, f"access to {addr:#x}, beyond the guest physical space")
            return pc
        if insn.kind != InsnClass.MEM:
            self._ending(pc, Outcome.UNSUPPORTED, f"non load/store access to {addr:#x}")
            return pc
        if not insn.iss:
            self._ending(pc, Outcome.NO_SYNDROME, f"MMIO access to {addr:#x} without a valid syndrome")
            return pc
        kernel = any(b <= addr < e and k for b, e, k in self.devices)
        regs = self.regs
        mask = (1 << (8 * insn.size)) - 1
        if insn.write:
            value = 0 if insn.rt == 31 else regs[X_REGS[insn.rt]] & mask
        else:
            # KVM's MMIO completion: the device's bytes, sign-extended per SSE,
            # truncated per SF, written to Rt (XZR discards).  An in-kernel
            # device reads as zero (vGIC RAZ space).
            value = 0 if kernel else self.case.mmio_read & mask
            loaded = value
            if insn.signed and loaded >> (8 * insn.size - 1) and self.emulation.mmio_sign_extend:
                loaded |= MASK64 & ~mask
                self.sign_extended = True
            if not insn.sf:
                loaded &= 0xFFFFFFFF
            if insn.rt != 31:
                regs[X_REGS[insn.rt]] = loaded
        return self._complete(pc, Special(kind=Meets.MMIO, access=Access(kernel, insn.write, addr, insn.size, value)))

    def _on_exit(self, pc: int) -> int:
        """Emulation stopped before an instruction that cannot run natively."""
        if self.misaligned is not None and self.misaligned[0] == pc:
            return self._alignment_fault(pc)
        insn = decode(self._word(pc))
        if insn.kind == InsnClass.STORE_EXCLUSIVE:
            return self._store_exclusive(pc, insn)
        if insn.kind == InsnClass.BRK:
            # A debug exit to the VMM (MDCR_EL2.TDE): the guest waits at it
            # until the VMM moves it on.
            self._ending(pc, Outcome.BREAKPOINT, f"brk #{insn.imm:#x}")
            return pc
        if insn.kind == InsnClass.SMC:
            return self._smc(pc, insn.imm)
        if insn.kind == InsnClass.GUEST_EXCEPTION:
            return self._take(pc, insn.reason, syndrome(insn))
        if insn.kind == InsnClass.ERET:
            return self._eret(pc)
        self._ending(pc, Outcome.UNSUPPORTED, f"{insn.reason} is not modelled")
        return pc

    # ------------------------------------------------------------ the exclusive monitor

    def _on_aligned_access(self, uc: Uc, pc: int, _size: int, _data) -> None:
        """An access that must be aligned is about to run ([Xn|SP] only):
        misaligned, it stops before it (the run loop takes the alignment
        fault); a load-exclusive marks its address for the local monitor."""
        word = self._word(pc)
        insn = decode(word)
        size = insn.size * (2 if insn.load_exclusive and (word >> 21) & 1 else 1)   # a pair: both
        addr = self._base_reg((word >> 5) & 31)
        if addr % size:
            self.misaligned = (pc, addr)
            uc.emu_stop()
        elif insn.load_exclusive:
            self.monitor = (self._index(pc), addr, size)

    def _alignment_fault(self, pc: int) -> int:
        """A data abort at EL1: ESR_EL1 EC 0x25, DFSC alignment, WnR; FAR_EL1
        the address; nothing retires (the handler's ERET runs it again)."""
        _, addr = self.misaligned
        self.misaligned = None
        insn = decode(self._word(pc))
        write_sysreg(self.uc, *EL1_SYSREGS["far_el1"], addr)
        esr = (EXCEPTIONS["alignment"].ec << 26) | ESR_IL | (ESR_WNR if insn.write else 0) | DFSC_ALIGNMENT
        return self._take(pc, "alignment", esr)

    def _store_exclusive(self, pc: int, insn: Insn) -> int:
        """STXR/STLXR/STXP/STLXP.  The monitor was cleared by every exception
        return since the guest's last entry (`monitor_since`, which only a
        model that runs the guest free writes; otherwise every store-exclusive
        fails, as it does under stepping): it succeeds if its load-exclusive
        came after that entry, at the same address and size (QEMU compares
        the address; the architecture leaves a mismatch IMPLEMENTATION
        DEFINED), and stores; else it fails without accessing memory."""
        word, since = self._word(pc), self.monitor_since
        self.monitor_since = None
        pair = (word >> 21) & 1
        addr, size = self._base_reg((word >> 5) & 31), insn.size * (2 if pair else 1)
        ok = since is not None and self.monitor is not None and self.monitor[0] >= since \
            and self.monitor[1:] == (addr, size)
        self.monitor = None
        if ok:
            data = b"".join((0 if r == 31 else self.regs[X_REGS[r]] & ((1 << (8 * insn.size)) - 1))
                            .to_bytes(insn.size, "little") for r in ((insn.rt, (word >> 10) & 31) if pair else (insn.rt,)))
            if not self._store(pc, addr, data):
                return pc
        if insn.rs != 31:
            self.regs[X_REGS[insn.rs]] = 0 if ok else 1
        return self._complete(pc, None)

    def _store(self, pc: int, addr: int, data: bytes) -> bool:
        """A store the guest CPU does itself, into RAM its load-exclusive
        already touched (else the run ends, unsupported)."""
        for base, end, off, _ in self.ram:
            if base <= addr and addr + len(data) <= end and (addr & ~(PAGE - 1)) not in self.code_pages:
                phys = ARENA + off + (addr - base)
                self.uc.mem_write(phys, data)
                self.dirty.update(range(phys & ~(SUBPAGE - 1), phys + len(data), SUBPAGE))
                return True
        self._ending(pc, Outcome.UNSUPPORTED, f"a store-exclusive that succeeds at {addr:#x}, outside data RAM")
        return False

    def _smc(self, pc: int, imm: int) -> int:
        """SMC, trapped by HCR_EL2.TSC and emulated by KVM as the era's SmcAbi says."""
        regs = self.regs
        func = regs[X_REGS[0]] & 0xFFFFFFFF
        if self.emulation.smc_abi == SmcAbi.SMCCC and imm == 0:
            if self.case.forwards(func):
                regs[X_REGS[0]] = self.case.hypercall_result
                return self._complete(pc, Special(kind=Meets.SMC_FORWARDED, detail=f"{func:#x}"))
            result = hvc_result(func)
            if result is None:
                self._ending(pc, Outcome.UNSUPPORTED, f"smc #0 with function {func:#x} is not modelled")
                return pc
            for reg, value in zip(X_REGS[:4], (result, 0, 0, 0)):
                regs[reg] = value
        else:
            regs[X_REGS[0]] = NOT_SUPPORTED
        return self._complete(pc, Special(kind=Meets.SMC, detail=f"{func:#x}"))

    def _base_reg(self, n: int) -> int:
        return self.regs[A.UC_ARM64_REG_SP if n == 31 else X_REGS[n]]

    def _word(self, pc: int) -> int:
        case = self.case
        word = case.code_word(pc)
        if word is not None:
            return word
        return B_SELF if pc == case.end else int.from_bytes(self.uc.mem_read(self._code_phys(pc), 4), "little")

    def _log(self, case: Case, writes: tuple[Write, ...], want_regs: bool) -> ExecLog:
        pcs: list[int] = []
        for addr, count in self.segments:
            pcs.extend(range(addr, addr + 4 * count, 4))
        n = len(pcs)
        pcs.append(self.stop_pc)
        specials = self.specials
        for index, kinds in self.faults.items():
            if index <= n:         # (a fault of a block that never ran is not one)
                old = specials.get(index, Special())
                specials[index] = Special(tuple(kinds), old.kind, old.access, old.detail)
        if self.outcome not in (Outcome.END, Outcome.MAX_STEPS):
            specials[n] = Special(specials.get(n, Special()).faults, self.outcome, detail=self.detail)
        log = ExecLog(case, pcs, specials, self.outcome or Outcome.END, self.detail, writes, self.emulation,
                      self.sign_extended, irq_at_end=self.irq_at_end)
        if want_regs:
            log._regs = {name: self.regs[rid] for name, rid in REG_IDS.items()}
        return log
