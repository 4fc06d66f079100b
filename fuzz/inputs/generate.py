"""The case generator: programs and exit schedules biased toward what matters.

A generated guest has a fixed, readable memory map and base registers that
point into each kind of memory, so a random load or store lands on RAM that
is or is not mapped at stage 2, userspace MMIO or the in-kernel device.
About a third of the instructions meet the hypervisor; the rest are ALU
work, branches, loops and exclusives.  Some guests have exception vectors:
they take SVCs, UNDEFs and FP traps, return with ERET, and get interrupts
from a VMM that drives their IRQ and FIQ lines.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from stepfuzz.oracle.case import INSN_EVENTS, IRQ_LINES, MAX_HW_BPS, REG_NAMES, Case, Event, Region, Vectors

from stepfuzz.fuzz.inputs import insns as I
from stepfuzz.fuzz.inputs.encoding import EVENT_KINDS

CODE_BASE = 0x10000
DATA, DATA2, MMIO, GICD_RAZ = 0x40000, 0x42000, 0x20000000, 0x800C000
# role registers: the base each kind of access goes through
R_DATA, R_MMIO, R_GICD, R_DATA2, R_CODE, R_LOOP = 20, 21, 22, 23, 24, 10
HVC_FUNCS = (0x84000000, 0x84000006, 0x80000000)     # PSCI_VERSION, MIGRATE_INFO_TYPE, SMCCC_VERSION
UNKNOWN_FUNC_BASES = (0x82000000, 0x83000000, 0xC2000000, 0xC3000000)   # SiP/OEM: no kernel implements them
FORWARDED = (0xC2000000, 16)      # the SiP range a generated VMM may ask KVM to forward to it (6.4+)
VBAR = 0x18000                    # generated vectors: in the code's RAM, clear of any generated code
R_HANDLER = 9                     # the handlers' scratch register
EQ = 0


@dataclass(frozen=True)
class GenConfig:
    min_insns: int = 6
    max_insns: int = 40
    max_steps: int = 200
    p_exit: float = 0.35          # share of snippets that meet the hypervisor
    max_events: int = 3
    p_forward: float = 0.3        # share of cases whose VMM takes hypercalls (the SMCCC filter)
    p_conversation: float = 0.5   # share of events that are the VMM's own actions (register writes, debug)
    p_vectors: float = 0.4        # share of guests with exception vectors (SVC, UNDEF, ERET, interrupts)
    p_guest_exception: float = 0.1   # with vectors: share of snippets that take an exception or return from one


DEFAULT = GenConfig()


def memory(rnd: random.Random) -> tuple[Region, ...]:
    return (Region(CODE_BASE, 0x10000, "ram", rnd.random() < 0.8),
            Region(DATA, 0x4000, "ram", rnd.random() < 0.5),
            Region(MMIO, 0x1000, "mmio"),
            Region(0x8000000, 0x10000, "mmio-kernel"))


def registers(rnd: random.Random) -> tuple[tuple[str, int], ...]:
    regs = {f"x{R_DATA}": DATA, f"x{R_MMIO}": MMIO, f"x{R_GICD}": GICD_RAZ, f"x{R_DATA2}": DATA2,
            f"x{R_CODE}": CODE_BASE, f"x{R_LOOP}": rnd.randint(1, 4), "sp": DATA + 0x3000}
    for r in rnd.sample(range(10), rnd.randint(0, 4)):
        regs[f"x{r}"] = rnd.choice([0, 1, rnd.getrandbits(16), rnd.getrandbits(64)])
    return tuple((name, regs[name]) for name in REG_NAMES if name in regs)


def _gpr(rnd: random.Random) -> int:
    return rnd.randrange(16)


def alu(rnd: random.Random) -> list[int]:
    d, n, m = _gpr(rnd), _gpr(rnd), _gpr(rnd)
    return [rnd.choice((
        lambda: I.add_imm(d, n, rnd.randrange(4096), sub=rnd.random() < 0.3, flags=rnd.random() < 0.2),
        lambda: I.alu_reg(rnd.randrange(8), d, n, m),
        lambda: I.movz(d, rnd.getrandbits(16), rnd.randrange(4), keep=rnd.random() < 0.3),
        lambda: I.madd(d, n, m, _gpr(rnd)),
        lambda: I.csel(d, n, m, rnd.randrange(16)),
        lambda: I.ror_imm(d, n, rnd.randrange(64)),
        lambda: I.NOP,
    ))()]


def memory_access(rnd: random.Random, base_reg: int, span: int) -> list[int]:
    """One load or store through `base_reg`, mostly with a valid syndrome."""
    rt, size = _gpr(rnd), rnd.choice((0, 1, 2, 3, 3, 3))
    off = rnd.randrange(0, span, 1 << size)
    r = rnd.random()
    if r < 0.55:
        opc = rnd.choice((0, 1, 1, 2, 3)) if size < 2 else rnd.choice((0, 1, 1, 2)) if size == 2 else rnd.choice((0, 1))
        return [I.ldst_uimm(size, opc, rt, base_reg, off)]
    if r < 0.7:
        return [I.ldst_unscaled(size, rnd.choice((0, 1)), rt, base_reg, rnd.randrange(0, 256, 1 << size))]
    if r < 0.8:
        return [I.movz(11, off), I.ldst_reg(size, rnd.choice((0, 1)), rt, base_reg, 11)]
    if r < 0.88:
        return [I.ldar(size, rt, base_reg, load=rnd.random() < 0.6)]
    if r < 0.94:      # writeback: no valid syndrome for MMIO
        return [I.ldst_unscaled(3, 1, rt, base_reg, 8, mode=rnd.choice((1, 3)))]
    return [I.ldst_pair(rnd.random() < 0.6, rt, _gpr(rnd), base_reg, rnd.randrange(0, 64, 16))]


def exit_snippet(rnd: random.Random) -> list[int]:
    """Instructions that meet the hypervisor."""
    r = rnd.random()
    if r < 0.2:
        return memory_access(rnd, R_MMIO, 0x100)
    if r < 0.35:
        return memory_access(rnd, R_DATA2 if rnd.random() < 0.5 else R_DATA, 0x1000)
    if r < 0.45:
        return [I.ldst_uimm(2, rnd.choice((0, 1)), _gpr(rnd), R_GICD, rnd.randrange(0, 0x100, 4))]
    if r < 0.7:
        read, rt = rnd.random() < 0.6, _gpr(rnd)
        if rnd.random() < 0.2:
            return [I.mdscr(read, rt)]
        return [I.debug_reg(read, rt, rnd.randrange(4, 8), rnd.randrange(4))]
    if r < 0.9:
        q = rnd.random()
        if q < 0.45:
            func = rnd.choice(HVC_FUNCS)
        elif q < 0.7:
            func = FORWARDED[0] | rnd.randrange(FORWARDED[1])     # forwarded when the VMM asks for it
        else:
            func = rnd.choice(UNKNOWN_FUNC_BASES) | rnd.getrandbits(16)
        # SMC only with ids every kernel answers alike (NOT_SUPPORTED or forwarded)
        call = I.smc(0 if rnd.random() < 0.8 else rnd.getrandbits(16)) if rnd.random() < 0.35 and func not in HVC_FUNCS else I.hvc(0)
        return [I.movz(0, func >> 16, 1), I.movz(0, func & 0xFFFF, 0, keep=True), call]
    if r < 0.95:
        return [I.brk(rnd.getrandbits(16))]        # a debug exit the VMM answers
    return [I.ldst_uimm(3, 1, _gpr(rnd), R_CODE, rnd.randrange(0, 0x100, 8))]   # load from a code page


def control_snippet(rnd: random.Random) -> list[int]:
    r = rnd.random()
    if r < 0.35:      # a forward branch over a few instructions
        skip = [w for _ in range(rnd.randint(1, 3)) for w in alu(rnd)]
        branch = rnd.choice((lambda o: I.b(o), lambda o: I.cbz(_gpr(rnd), o, rnd.random() < 0.5),
                             lambda o: I.b_cond(o, rnd.randrange(14)), lambda o: I.tbz(_gpr(rnd), rnd.randrange(64), o)))
        return [branch(len(skip) + 1)] + skip
    if r < 0.65:      # a bounded loop: body, then count x10 down
        body = [w for _ in range(rnd.randint(1, 3)) for w in (exit_snippet(rnd) if rnd.random() < 0.4 else alu(rnd))]
        return [I.movz(R_LOOP, rnd.randint(1, 4))] + body + [I.add_imm(R_LOOP, R_LOOP, 1, sub=True), I.cbz(R_LOOP, -(len(body) + 1), nonzero=True)]
    if r < 0.8:       # call and return
        return [I.bl(2), I.b(2), I.ret()]
    if r < 0.95:      # load-exclusive, store-exclusive
        base = rnd.choice((R_DATA, R_DATA2))
        return [I.ldxr(3, 1, base), I.add_imm(1, 1, 1), I.stxr(3, 2, 1, base)]
    return [I.B_SELF]  # spins until max_steps


def exception_snippet(rnd: random.Random) -> list[int]:
    """Instructions that take an exception to the guest's EL1, return from
    one, or mask and unmask interrupts (for a guest with vectors)."""
    r = rnd.random()
    if r < 0.3:
        return [I.svc(rnd.getrandbits(16))]
    if r < 0.45:
        return [rnd.choice((I.udf(rnd.getrandbits(16)), I.hlt(rnd.getrandbits(16))))]
    if r < 0.55:
        return [I.FMOV_D0_X1]
    if r < 0.75:          # an ERET to the next instruction, with DAIF from SPSR_EL1
        spsr = rnd.choice((0x3C5, 0x345, 0x305, 0x5))
        return [I.movz(R_HANDLER, spsr), I.msr(I.SPSR_EL1, R_HANDLER), I.adr(R_HANDLER, 3),
                I.msr(I.ELR_EL1, R_HANDLER), I.ERET]
    return [I.msr_daif(rnd.random() < 0.4, rnd.choice((2, 1, 3)))]


def handler(rnd: random.Random, kind: str) -> tuple[int, ...]:
    """A handler that returns: past the instruction that took a synchronous
    exception (an SVC's return address is past it already), or to where an
    interrupt came.  Sometimes with work of its own that meets KVM first."""
    work = [w for _ in range(rnd.randint(0, 2)) for w in (alu(rnd) if rnd.random() < 0.5 else
                                                        memory_access(rnd, R_MMIO, 0x100))]
    if kind != "sync":
        return tuple(work + [I.ERET])
    skip = [I.mrs(R_HANDLER, I.ESR_EL1), I.lsr_imm(R_HANDLER, R_HANDLER, 26), I.cmp_imm(R_HANDLER, 0x15),
            I.b_cond(4, EQ), I.mrs(R_HANDLER, I.ELR_EL1), I.add_imm(R_HANDLER, R_HANDLER, 4),
            I.msr(I.ELR_EL1, R_HANDLER)]
    return tuple(work + skip + [I.ERET])


def vectors(rnd: random.Random) -> Vectors:
    return Vectors(VBAR, tuple((kind, handler(rnd, kind), None) for kind in ("sync", "irq", "fiq")))


def program(rnd: random.Random, cfg: GenConfig = DEFAULT, with_vectors: bool = False) -> list[int]:
    target = rnd.randint(cfg.min_insns, cfg.max_insns)
    words: list[int] = []
    p_exc = cfg.p_guest_exception if with_vectors else 0.0
    while len(words) < target:
        r = rnd.random()
        words += (exception_snippet(rnd) if r < p_exc else exit_snippet(rnd) if r < p_exc + cfg.p_exit
                  else control_snippet(rnd) if r < p_exc + cfg.p_exit + 0.2 else alu(rnd))
    return words


def event(rnd: random.Random, n_insns: int, base: int = CODE_BASE, cfg: GenConfig = DEFAULT,
          irq: bool = False) -> Event:
    """Any kind of event, timed near the program's instructions or its first exits."""
    if rnd.random() < cfg.p_conversation:
        return vmm_action(rnd, n_insns, base, irq)
    when, what = rnd.choice(EVENT_KINDS)
    at = rnd.randint(1, n_insns + 2) if when in INSN_EVENTS else rnd.randint(1, 4)
    return Event(when, at, what)


def vmm_action(rnd: random.Random, n_insns: int, base: int, irq: bool = False) -> Event:
    """What a debugger does between two KVM_RUNs: write a register, change
    how it debugs (step, continue to breakpoints, stop debugging), or (with
    `irq`, a guest with vectors) drive the vCPU's interrupt lines."""
    when = rnd.choice(("stop", "stop", "stop", "mmio-exit", "hypercall-exit", "eintr", "start"))
    at = 0 if when == "start" else rnd.randint(1, 4)
    code = lambda: base + 4 * rnd.randrange(n_insns + 1)     # noqa: E731 (an address in the code)
    if irq and rnd.random() < 0.5:
        if when != "start":
            at = rnd.randint(1, 8)
        return Event(when, at, "irq-line", line=rnd.choice(IRQ_LINES[:1] * 3 + IRQ_LINES[1:]),
                     level=int(rnd.random() < 0.6))
    r = rnd.random()
    if r < 0.4:
        q = rnd.random()
        if q < 0.5:
            return Event(when, at, "set-reg", reg="pc", value=code())
        return Event(when, at, "set-reg", reg=f"x{rnd.randrange(16)}", value=rnd.choice((0, 1, rnd.getrandbits(64))))
    control = rnd.choice(("step", "step", "continue", "continue", "off"))
    bps = () if control == "off" else tuple(sorted({code() for _ in range(rnd.randint(0, MAX_HW_BPS))}))
    return Event(when, at, "debug", control=control, hw_bp=bps, sw_bp=control != "off" and rnd.random() < 0.3)


def events(rnd: random.Random, n_insns: int, cfg: GenConfig = DEFAULT, base: int = CODE_BASE,
           irq: bool = False) -> tuple[Event, ...]:
    return tuple(event(rnd, n_insns, base, cfg, irq) for _ in range(rnd.randint(0, cfg.max_events)))


def mmio_value(rnd: random.Random) -> int:
    """What a userspace MMIO read returns: sign bits at each access size, or anything."""
    return rnd.choice((0, 0x80, 0x8000, 0x80000000, rnd.getrandbits(64)))


def generate(rnd: random.Random, cfg: GenConfig = DEFAULT) -> Case:
    with_vectors = rnd.random() < cfg.p_vectors
    words = program(rnd, cfg, with_vectors)
    # sometimes start near the end of a page so the code crosses into the next
    base = CODE_BASE + (0x1000 - 4 * rnd.randint(1, 8) if rnd.random() < 0.15 else 0)
    forward = rnd.random() < cfg.p_forward
    evs = events(rnd, len(words), cfg, base, irq=with_vectors)
    mem = memory(rnd)
    if any(e.what == "irq-line" for e in evs):
        # KVM_IRQ_LINE drives the vCPU's own input only in a VM without the vGIC
        mem = tuple(r for r in mem if r.kind != "mmio-kernel")
    el1 = (("daif", rnd.choice((0x3C0, 0x340, 0x300))),) if with_vectors and rnd.random() < 0.5 else ()
    return Case(base=base, words=tuple(words), regs=registers(rnd), memory=mem,
                mmio_read=mmio_value(rnd), el1_regs=el1, vectors=vectors(rnd) if with_vectors else None,
                events=evs, max_steps=cfg.max_steps, source="<generated>",
                smccc_forward=(FORWARDED,) if forward else (),
                hypercall_result=rnd.choice((0, 5, rnd.getrandbits(64))) if forward else 0)
