"""Case files: the public, versioned JSON format (docs/case-format.md).

A case is a guest program, its memory map and an exit schedule.  Loading
validates everything a run depends on, so later stages never see a
malformed case: every problem becomes a `CaseError` naming the file and the
field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable

from .vocabulary import DivergenceKind

FORMAT_VERSION = 1
PAGE = 0x1000
IPA_LIMIT = 1 << 40          # KVM's default stage-2 input range (40 bits)
MAX_INSNS = 4096
MAX_STEPS_LIMIT = 1_000_000
DEFAULT_MAX_STEPS = 1000
MAX_RAM = 64 << 20           # total guest RAM a case may declare

REGION_KINDS = ("ram", "mmio", "mmio-kernel")
REG_NAMES = tuple(f"x{i}" for i in range(31)) + ("sp",)
# PSTATE.DAIF and the EL1 exception registers a case may start with
EL1_REG_NAMES = ("daif", "elr_el1", "spsr_el1", "esr_el1", "far_el1")
DAIF_MASK = 0x3C0
DAIF_RESET = 0x3C0            # all masked, as a vCPU starts
SET_REG_NAMES = ("pc", *REG_NAMES, "daif")

# What the VMM can do between two KVM_RUN calls, and the fields each takes
# (name -> required?).  `debug`: KVM_SET_GUEST_DEBUG; `set-reg`:
# KVM_SET_ONE_REG; `irq-line`: KVM_IRQ_LINE; `serror`: KVM_SET_VCPU_EVENTS;
# `vcpu-init`: KVM_ARM_VCPU_INIT again.
VMM_ACTIONS: dict[str, dict[str, bool]] = {
    "immediate-exit": {}, "signal": {}, "preempt": {},
    "set-reg": {"reg": True, "value": True},
    "debug": {"control": True, "sw-bp": False, "hw-bp": False},
    "irq-line": {"line": True, "level": True},
    "serror": {},
    "vcpu-init": {},
}
DEBUG_CONTROLS = ("step", "continue", "off")
IRQ_LINES = ("irq", "fiq")
MAX_HW_BPS = 3                # hardware breakpoints of a case (the VMM keeps one more at the end when continuing)

# when -> (trigger key, allowed actions); "" = no count (`start`)
EVENT_RULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "before": ("insn", ("host-irq",)),
    "after": ("insn", ("host-irq",)),
    "trap": ("insn", ("signal",)),
    "start": ("", tuple(VMM_ACTIONS)),
    "mmio-exit": ("n", tuple(VMM_ACTIONS)),
    "stop": ("n", tuple(VMM_ACTIONS)),
    "hypercall-exit": ("n", tuple(VMM_ACTIONS)),
    "system-event": ("n", tuple(VMM_ACTIONS)),
    "eintr": ("n", tuple(VMM_ACTIONS)),
}
# events timed by a guest instruction (the others by the VMM's own count of exits/stops)
INSN_EVENTS = tuple(when for when, (key, _) in EVENT_RULES.items() if key == "insn")

# what the VMM does with a data abort that has no valid syndrome
NISV_POLICIES = ("end", "skip", "abort")
VECTOR_SLOTS = {"sync": 0x200, "irq": 0x280, "fiq": 0x300, "serror": 0x380}
VECTOR_MAX_INSNS = 32
SMCCC_FORWARD_MAX = 32        # ranges in one filter
SMCCC_RESERVED = ((0x80000000, 0x8000FFFF), (0xC0000000, 0xC000FFFF))   # -EEXIST from the filter

TOP_FIELDS = ("stepfuzz", "name", "code", "regs", "memory", "mmio_read", "vectors",
              "smccc_forward", "hypercall_result", "nisv", "events", "max_steps", "expect")
# `expect` (optional): what a seed case is known to show, era -> "agree" or a
# divergence kind; tests and `stepfuzz run` check it.
EXPECT_VALUES = ("agree", "not-reproducible", *DivergenceKind)


class CaseError(ValueError):
    """A case that cannot be run; str() is a one-line message."""

    def __init__(self, source: str, where: str, problem: str):
        self.source, self.where, self.problem = source, where, problem
        super().__init__(f"{source}: {where}: {problem}" if where else f"{source}: {problem}")


@dataclass(frozen=True, slots=True)
class Region:
    base: int
    size: int
    kind: str                 # one of REGION_KINDS
    prefault: bool = False    # ram only: mapped at stage 2 before the run

    @property
    def end(self) -> int:
        return self.base + self.size

    def __contains__(self, addr: int) -> bool:
        return self.base <= addr < self.base + self.size


@dataclass(frozen=True, slots=True)
class Event:
    when: str                 # key of EVENT_RULES
    at: int                   # the `insn` or `n` value (1-based; 0 for `start`)
    what: str
    # set-reg
    reg: str = ""
    value: int = 0
    # debug
    control: str = ""
    sw_bp: bool = False
    hw_bp: tuple[int, ...] = ()
    # irq-line
    line: str = ""
    level: int = 0

    def to_json(self) -> dict[str, Any]:
        key = EVENT_RULES[self.when][0]
        out: dict[str, Any] = {"when": self.when, **({key: self.at} if key else {}), "what": self.what}
        if self.what == "set-reg":
            out |= {"reg": self.reg, "value": hex(self.value)}
        elif self.what == "debug":
            out["control"] = self.control
            if self.sw_bp:
                out["sw-bp"] = True
            if self.hw_bp:
                out["hw-bp"] = [hex(a) for a in self.hw_bp]
        elif self.what == "irq-line":
            out |= {"line": self.line, "level": self.level}
        return out


@dataclass(frozen=True, slots=True)
class Vectors:
    """The guest's own exception handlers: VBAR_EL1 and the code at each
    vector taken from EL1 with SP_EL1 (base + VECTOR_SLOTS[kind])."""
    base: int
    handlers: tuple[tuple[str, tuple[int, ...], str | None], ...]   # (kind, words, asm text)

    def words_at(self, kind: str) -> tuple[int, ...]:
        for k, words, _ in self.handlers:
            if k == kind:
                return words
        return ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"base": hex(self.base)}
        for kind, words, asm in self.handlers:
            out[kind] = asm if asm is not None else [f"0x{w:08x}" for w in words]
        return out


@dataclass(frozen=True)
class Case:
    base: int
    words: tuple[int, ...]            # the guest code, one 32-bit word per instruction
    regs: tuple[tuple[str, int], ...] = ()
    memory: tuple[Region, ...] = ()
    mmio_read: int = 0
    events: tuple[Event, ...] = ()
    el1_regs: tuple[tuple[str, int], ...] = ()    # daif and EL1 exception registers at the start
    vectors: Vectors | None = None
    smccc_forward: tuple[tuple[int, int], ...] = ()   # (first function id, count) forwarded to the VMM
    hypercall_result: int = 0         # x0 the VMM answers a forwarded hypercall with
    nisv: str = "end"                 # NISV_POLICIES
    max_steps: int = DEFAULT_MAX_STEPS
    name: str = ""
    asm: str | None = None            # the source text, when the case was written in assembly
    expect: tuple[tuple[str, str], ...] = ()
    source: str = field(default="<case>", compare=False)

    @cached_property
    def end(self) -> int:
        """The address where the run ends: just past the last instruction."""
        return self.base + 4 * len(self.words)

    def word_at(self, pc: int) -> int:
        """The instruction word at `pc`, an address of the code."""
        return self.words[(pc - self.base) >> 2]

    @cached_property
    def handler_words(self) -> dict[int, int]:
        """The exception handlers' instructions by address (empty without `vectors`)."""
        v = self.vectors
        if v is None:
            return {}
        return {v.base + VECTOR_SLOTS[kind] + 4 * i: w for kind, words, _ in v.handlers for i, w in enumerate(words)}

    def pcs_where(self, pred) -> list[int]:
        """The addresses of the case's own instructions (code, then handlers)
        whose word satisfies `pred`."""
        return ([self.base + 4 * i for i, w in enumerate(self.words) if pred(w)]
                + [a for a, w in self.handler_words.items() if pred(w)])

    def code_word(self, pc: int) -> int | None:
        """The instruction at `pc` if it is the case's own (code or a handler)."""
        if self.base <= pc < self.end:
            return self.words[(pc - self.base) >> 2]
        return self.handler_words.get(pc)

    def vector(self, kind: str) -> int:
        """Where an exception of `kind` (a VECTOR_SLOTS key) taken from EL1 goes."""
        assert self.vectors is not None
        return self.vectors.base + VECTOR_SLOTS[kind]

    def region_at(self, addr: int) -> Region | None:
        for r in self.memory:
            if r.base <= addr < r.base + r.size:
                return r
        return None

    def to_json(self) -> dict[str, Any]:
        code: dict[str, Any] = {"base": hex(self.base)}
        if self.asm is not None:
            code["asm"] = self.asm
        else:
            code["words"] = [f"0x{w:08x}" for w in self.words]
        out: dict[str, Any] = {"stepfuzz": FORMAT_VERSION}
        if self.name:
            out["name"] = self.name
        out["code"] = code
        if self.regs or self.el1_regs:
            out["regs"] = {k: hex(v) for k, v in self.regs + self.el1_regs}
        out["memory"] = [
            {"base": hex(r.base), "size": hex(r.size), "kind": r.kind,
             **({"prefault": True} if r.prefault else {})}
            for r in self.memory]
        if self.mmio_read:
            out["mmio_read"] = hex(self.mmio_read)
        if self.vectors is not None:
            out["vectors"] = self.vectors.to_json()
        if self.smccc_forward:
            out["smccc_forward"] = [[hex(first), count] for first, count in self.smccc_forward]
        if self.hypercall_result:
            out["hypercall_result"] = hex(self.hypercall_result)
        if self.nisv != "end":
            out["nisv"] = self.nisv
        if self.events:
            out["events"] = [e.to_json() for e in self.events]
        if self.max_steps != DEFAULT_MAX_STEPS:
            out["max_steps"] = self.max_steps
        if self.expect:
            out["expect"] = dict(self.expect)
        return out

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"

    @property
    def insn_timed(self) -> bool:
        """Does it need an event timed by a guest instruction?  No VMM can
        time one, so such a case reproduces in the models only."""
        return any(e.when in INSN_EVENTS for e in self.events)

    def daif(self) -> int:
        return dict(self.el1_regs).get("daif", DAIF_RESET)

    def needs(self) -> tuple[str, ...]:
        """The KVM API features (eras.FEATURES) a VMM needs to run this case."""
        return ("smccc-filter",) if self.smccc_forward else ()

    def forwards(self, func: int) -> bool:
        """Does the VMM ask KVM to forward SMCCC function `func` to it?"""
        func &= 0xFFFFFFFF
        return any(first <= func < first + count for first, count in self.smccc_forward)

    def keep_key(self) -> tuple[bool, int]:
        """Which of two cases of one finding to keep: one a VMM can reproduce,
        then the smaller."""
        return (self.insn_timed, len(self.words))

    def with_words(self) -> "Case":
        """The same case with its code as words (drops the assembly text)."""
        from dataclasses import replace
        return replace(self, asm=None)

    def bounded(self, max_steps: int) -> "Case":
        """The same case run for at most `max_steps` instructions (campaigns
        bound every input, so that no input makes an execution slow)."""
        from dataclasses import replace
        return self if self.max_steps <= max_steps else replace(self, max_steps=max_steps)


# ---------------------------------------------------------------- parsing

MAX_CASE_BYTES = 16 << 20     # a case file larger than this is refused unread


def _show(value: Any) -> str:
    """A value as an error message quotes it: short, one line, printable."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _text(value: Any, src: str, where: str, one_line: bool = False) -> str:
    """A string field: valid Unicode (no lone surrogates), and for one-line
    fields no control characters (they would reach terminals and reports)."""
    if not isinstance(value, str):
        raise CaseError(src, where, f"expected a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise CaseError(src, where, "not valid Unicode (a lone surrogate)") from None
    if one_line and any(ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0 for ch in value):
        raise CaseError(src, where, "control characters are not allowed")
    return value


def _num(value: Any, src: str, where: str, bits: int = 64) -> int:
    if isinstance(value, bool):
        raise CaseError(src, where, f"expected a number, got {json.dumps(value)}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        text = value.strip().lower().replace("_", "")
        try:
            n = int(text, 16) if text.startswith("0x") else int(text, 10)
        except ValueError:
            raise CaseError(src, where, f"not a number: {_show(value)}") from None
    else:
        raise CaseError(src, where, f"expected a number, got {type(value).__name__}")
    if not 0 <= n < (1 << bits):
        raise CaseError(src, where, f"{_show(value)} is outside 0..2^{bits}-1")
    return n


def _obj(value: Any, src: str, where: str, allowed: Iterable[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CaseError(src, where, f"expected an object, got {type(value).__name__}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        key = unknown[0] if unknown[0].isprintable() and len(unknown[0]) <= 40 else _show(unknown[0])
        name = f"{where}.{key}" if where else key
        raise CaseError(src, name, f"unknown field (allowed: {', '.join(allowed)})")
    return value


def _list(value: Any, src: str, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise CaseError(src, where, f"expected a list, got {type(value).__name__}")
    return value


def parse_case(data: Any, source: str = "<case>") -> Case:
    """Validate decoded JSON and build a Case (assembling `asm` if present)."""
    src = source
    top = _obj(data, src, "", TOP_FIELDS)
    if "stepfuzz" not in top:
        raise CaseError(src, "stepfuzz", "missing (the format version, 1)")
    if type(top["stepfuzz"]) is not int or top["stepfuzz"] != FORMAT_VERSION:
        raise CaseError(src, "stepfuzz", f"unsupported format version {_show(top['stepfuzz'])} "
                        f"(this stepfuzz reads {FORMAT_VERSION})")
    name = _text(top.get("name", ""), src, "name", one_line=True)

    if "code" not in top:
        raise CaseError(src, "code", "missing")
    code = _obj(top["code"], src, "code", ("base", "asm", "words"))
    if "base" not in code:
        raise CaseError(src, "code.base", "missing")
    base = _num(code["base"], src, "code.base")
    if base % 4:
        raise CaseError(src, "code.base", f"{base:#x} is not 4-byte aligned")
    if ("asm" in code) == ("words" in code):
        raise CaseError(src, "code", "needs exactly one of 'asm' and 'words'")
    asm_text: str | None = None
    if "asm" in code:
        asm_text = _text(code["asm"], src, "code.asm")
        from .asm import AsmError, assemble
        try:
            words = tuple(assemble(asm_text, base))
        except AsmError as e:
            raise CaseError(src, "code.asm", str(e)) from None
    else:
        raw = _list(code["words"], src, "code.words")
        words = tuple(_num(w, src, f"code.words[{i}]", bits=32) for i, w in enumerate(raw))
    if not words:
        raise CaseError(src, "code", "no instructions")
    if len(words) > MAX_INSNS:
        raise CaseError(src, "code", f"{len(words)} instructions (at most {MAX_INSNS})")

    regs_in = _obj(top.get("regs", {}), src, "regs", REG_NAMES + EL1_REG_NAMES)
    regs = tuple((k, _num(regs_in[k], src, f"regs.{k}")) for k in REG_NAMES if k in regs_in)
    el1_regs = tuple((k, _num(regs_in[k], src, f"regs.{k}")) for k in EL1_REG_NAMES if k in regs_in)
    for k, v in el1_regs:
        if k == "daif" and v & ~DAIF_MASK:
            raise CaseError(src, "regs.daif", f"{v:#x} has bits outside D, A, I, F ({DAIF_MASK:#x})")
        if k == "spsr_el1" and v >> 32:
            raise CaseError(src, "regs.spsr_el1", f"{v:#x} is wider than 32 bits")

    memory = tuple(_parse_region(r, src, i) for i, r in enumerate(_list(top.get("memory", []), src, "memory")))
    _check_memory(memory, base, len(words), src)

    mmio_read = _num(top.get("mmio_read", 0), src, "mmio_read")
    vectors = _parse_vectors(top["vectors"], src, memory, base, len(words)) if "vectors" in top else None
    smccc_forward = _parse_smccc_forward(top.get("smccc_forward", []), src)
    hypercall_result = _num(top.get("hypercall_result", 0), src, "hypercall_result")
    nisv = top.get("nisv", "end")
    if not isinstance(nisv, str) or nisv not in NISV_POLICIES:
        raise CaseError(src, "nisv", f"unknown policy {_show(nisv)} (known: {', '.join(NISV_POLICIES)})")
    events = tuple(_parse_event(e, src, i) for i, e in enumerate(_list(top.get("events", []), src, "events")))
    max_steps = _num(top.get("max_steps", DEFAULT_MAX_STEPS), src, "max_steps")
    if not 1 <= max_steps <= MAX_STEPS_LIMIT:
        raise CaseError(src, "max_steps", f"{max_steps} is outside 1..{MAX_STEPS_LIMIT}")
    expect = _parse_expect(top.get("expect", {}), src)
    if any(e.what == "irq-line" for e in events) and any(r.kind == "mmio-kernel" for r in memory):
        # KVM_IRQ_LINE drives the vCPU's own input only while the VM has no
        # in-kernel irqchip, and an mmio-kernel region is the vGIC's
        raise CaseError(src, "events", "irq-line drives the vCPU's interrupt input directly, "
                        "which a VM with an mmio-kernel region (its vGIC) does not allow")
    return Case(base=base, words=words, regs=regs, memory=memory, mmio_read=mmio_read,
                events=events, max_steps=max_steps, name=name, asm=asm_text, expect=expect,
                el1_regs=el1_regs, vectors=vectors, smccc_forward=smccc_forward,
                hypercall_result=hypercall_result, nisv=nisv, source=src)


def _parse_vectors(value: Any, src: str, memory: tuple[Region, ...], base: int, n: int) -> Vectors:
    v = _obj(value, src, "vectors", ("base", *VECTOR_SLOTS))
    if "base" not in v:
        raise CaseError(src, "vectors.base", "missing")
    vbar = _num(v["base"], src, "vectors.base")
    if vbar % 0x800:
        raise CaseError(src, "vectors.base", f"{vbar:#x} is not 2 KiB aligned (VBAR_EL1)")
    table_end = vbar + 0x800
    home = next((r for r in memory if r.base <= vbar < r.end), None)
    if home is None or home.kind != "ram" or table_end > home.end:
        raise CaseError(src, "vectors.base", f"the table {vbar:#x}..{table_end:#x} is not inside one ram region")
    if vbar < base + 4 * (n + 1) and base < table_end:
        raise CaseError(src, "vectors.base", f"the table {vbar:#x}..{table_end:#x} overlaps the code")
    handlers = []
    for kind, offset in VECTOR_SLOTS.items():
        if kind not in v:
            continue
        where = f"vectors.{kind}"
        text: str | None = None
        if isinstance(v[kind], list):
            words = tuple(_num(w, src, f"{where}[{i}]", bits=32) for i, w in enumerate(v[kind]))
        else:
            text = _text(v[kind], src, where)
            from .asm import AsmError, assemble
            try:
                words = tuple(assemble(text, vbar + offset))
            except AsmError as e:
                raise CaseError(src, where, str(e)) from None
        if not words:
            raise CaseError(src, where, "no instructions")
        if len(words) > VECTOR_MAX_INSNS:
            raise CaseError(src, where, f"{len(words)} instructions (at most {VECTOR_MAX_INSNS})")
        handlers.append((kind, words, text))
    return Vectors(vbar, tuple(handlers))


def _parse_smccc_forward(value: Any, src: str) -> tuple[tuple[int, int], ...]:
    ranges = []
    items = _list(value, src, "smccc_forward")
    if len(items) > SMCCC_FORWARD_MAX:
        raise CaseError(src, "smccc_forward", f"{len(items)} ranges (at most {SMCCC_FORWARD_MAX})")
    for i, item in enumerate(items):
        where = f"smccc_forward[{i}]"
        pair = _list(item, src, where)
        if len(pair) != 2:
            raise CaseError(src, where, "expected [first function id, count]")
        first = _num(pair[0], src, f"{where}[0]", bits=32)
        count = _num(pair[1], src, f"{where}[1]", bits=32)
        if count < 1 or first + count > 1 << 32:
            raise CaseError(src, where, f"[{first:#x}, {count}] is not a range of 32-bit function ids")
        for lo, hi in SMCCC_RESERVED:
            if first <= hi and lo < first + count:
                raise CaseError(src, where, f"overlaps the Arm architecture calls {lo:#x}..{hi:#x}, "
                                "which KVM keeps for itself (the filter refuses them)")
        for j, (f2, c2) in enumerate(ranges):
            if first < f2 + c2 and f2 < first + count:
                raise CaseError(src, where, f"overlaps smccc_forward[{j}] (KVM refuses overlapping filter ranges)")
        ranges.append((first, count))
    return tuple(ranges)


def _parse_expect(value: Any, src: str) -> tuple[tuple[str, str], ...]:
    from .kvm.eras import ERA_IDS
    table = _obj(value, src, "expect", ERA_IDS)
    for era, what in table.items():
        if not isinstance(what, str) or what not in EXPECT_VALUES:
            raise CaseError(src, f"expect.{era}", f"unknown expectation {_show(what)} (known: {', '.join(EXPECT_VALUES)})")
    return tuple((era, table[era]) for era in ERA_IDS if era in table)


def _parse_region(value: Any, src: str, i: int) -> Region:
    where = f"memory[{i}]"
    r = _obj(value, src, where, ("base", "size", "kind", "prefault"))
    for key in ("base", "size", "kind"):
        if key not in r:
            raise CaseError(src, f"{where}.{key}", "missing")
    base = _num(r["base"], src, f"{where}.base")
    size = _num(r["size"], src, f"{where}.size")
    kind = r["kind"]
    if not isinstance(kind, str) or kind not in REGION_KINDS:
        raise CaseError(src, f"{where}.kind", f"unknown kind {_show(kind)} (known: {', '.join(REGION_KINDS)})")
    if base % PAGE or size % PAGE or size == 0:
        raise CaseError(src, where, f"base {base:#x} and size {size:#x} must be non-zero multiples of 4 KiB")
    if base + size > IPA_LIMIT:
        raise CaseError(src, where, f"ends at {base + size:#x}, beyond the 40-bit guest physical space")
    prefault = r.get("prefault", False)
    if not isinstance(prefault, bool):
        raise CaseError(src, f"{where}.prefault", "expected true or false")
    if prefault and kind != "ram":
        raise CaseError(src, f"{where}.prefault", f"only ram can be prefaulted, not {kind}")
    return Region(base, size, kind, prefault)


def _check_memory(memory: tuple[Region, ...], base: int, n: int, src: str) -> None:
    spans = sorted(enumerate(memory), key=lambda ir: ir[1].base)
    for (i, a), (j, b) in zip(spans, spans[1:]):
        if b.base < a.end:
            raise CaseError(src, f"memory[{j}]", f"overlaps memory[{i}] ({a.base:#x}..{a.end:#x})")
    ram = sum(r.size for r in memory if r.kind == "ram")
    if ram > MAX_RAM:
        raise CaseError(src, "memory", f"{ram >> 20} MiB of ram (at most {MAX_RAM >> 20} MiB)")
    # The code plus the branch-to-self that follows it must lie in one ram region.
    last = base + 4 * n
    home = next((r for r in memory if r.base <= base < r.end), None)
    if home is None or home.kind != "ram":
        raise CaseError(src, "code.base", f"{base:#x} is not inside a ram region")
    if last + 4 > home.end:
        raise CaseError(src, "code", f"code runs to {last + 4:#x}, past the end of its ram region ({home.end:#x})")


def _parse_event(value: Any, src: str, i: int) -> Event:
    where = f"events[{i}]"
    if not isinstance(value, dict):
        raise CaseError(src, where, "expected an object")
    when = value.get("when")
    if not isinstance(when, str) or when not in EVENT_RULES:
        raise CaseError(src, f"{where}.when", f"unknown trigger {_show(when)} (known: {', '.join(EVENT_RULES)})")
    key, actions = EVENT_RULES[when]
    what = value.get("what")
    if not isinstance(what, str) or what not in actions:
        raise CaseError(src, f"{where}.what", f"{_show(what)} cannot happen at '{when}' (allowed: {', '.join(actions)})")
    fields = VMM_ACTIONS.get(what, {}) if key != "insn" else {}
    _obj(value, src, where, ("when", *((key,) if key else ()), "what", *fields))
    at = 0
    if key:
        if key not in value:
            raise CaseError(src, f"{where}.{key}", f"missing (a '{when}' event counts {key})")
        at = _num(value[key], src, f"{where}.{key}", bits=32)
        if at < 1:
            raise CaseError(src, f"{where}.{key}", "counts from 1")
    for name, required in fields.items():
        if required and name not in value:
            raise CaseError(src, f"{where}.{name}", f"missing (a '{what}' event needs it)")
    args: dict[str, Any] = {}
    if what == "set-reg":
        reg = value["reg"]
        if not isinstance(reg, str) or reg not in SET_REG_NAMES:
            raise CaseError(src, f"{where}.reg", f"unknown register {_show(reg)} (known: pc, x0-x30, sp, daif)")
        v = _num(value["value"], src, f"{where}.value")
        if reg == "pc" and v % 4:
            raise CaseError(src, f"{where}.value", f"PC {v:#x} is not 4-byte aligned")
        if reg == "daif" and v & ~DAIF_MASK:
            raise CaseError(src, f"{where}.value", f"{v:#x} has bits outside D, A, I, F ({DAIF_MASK:#x})")
        args = {"reg": reg, "value": v}
    elif what == "debug":
        control = value["control"]
        if not isinstance(control, str) or control not in DEBUG_CONTROLS:
            raise CaseError(src, f"{where}.control", f"unknown control {_show(control)} (known: {', '.join(DEBUG_CONTROLS)})")
        sw_bp = value.get("sw-bp", False)
        if not isinstance(sw_bp, bool):
            raise CaseError(src, f"{where}.sw-bp", "expected true or false")
        bps = _list(value.get("hw-bp", []), src, f"{where}.hw-bp")
        if len(bps) > MAX_HW_BPS:
            raise CaseError(src, f"{where}.hw-bp", f"{len(bps)} breakpoints (at most {MAX_HW_BPS})")
        hw_bp = tuple(_num(a, src, f"{where}.hw-bp[{i}]") for i, a in enumerate(bps))
        for i, a in enumerate(hw_bp):
            if a % 4:
                raise CaseError(src, f"{where}.hw-bp[{i}]", f"{a:#x} is not 4-byte aligned")
        if control == "off" and (sw_bp or hw_bp):
            raise CaseError(src, where, "breakpoints need debug enabled ('step' or 'continue'), not 'off'")
        args = {"control": control, "sw_bp": sw_bp, "hw_bp": tuple(sorted(set(hw_bp)))}
    elif what == "irq-line":
        line = value["line"]
        if not isinstance(line, str) or line not in IRQ_LINES:
            raise CaseError(src, f"{where}.line", f"unknown line {_show(line)} (known: {', '.join(IRQ_LINES)})")
        level = _num(value["level"], src, f"{where}.level")
        if level not in (0, 1):
            raise CaseError(src, f"{where}.level", f"{level} is not 0 or 1")
        args = {"line": line, "level": level}
    return Event(when, at, what, **args)


def loads_case(text: str, source: str = "<case>") -> Case:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CaseError(source, "", f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise CaseError(source, "", "not valid JSON here: nested too deeply") from None
    except ValueError as e:             # e.g. an integer of more than 4300 digits
        raise CaseError(source, "", f"not valid JSON here: {str(e).split(':')[0]}") from None
    return parse_case(data, source)


def load_case(path: str | Path) -> Case:
    p = Path(path)
    try:
        # a FIFO or a device would block or never end: only regular files
        if not p.is_file():
            raise CaseError(str(p), "", "no such file" if not p.exists() else "not a regular file")
        with open(p, "rb") as f:
            raw = f.read(MAX_CASE_BYTES + 1)
    except OSError as e:
        raise CaseError(str(p), "", f"cannot read: {e.strerror or e}") from None
    if len(raw) > MAX_CASE_BYTES:
        raise CaseError(str(p), "", f"larger than {MAX_CASE_BYTES >> 20} MiB: not a case file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CaseError(str(p), "", f"not UTF-8 text (byte {e.start})") from None
    return loads_case(text, str(p))
