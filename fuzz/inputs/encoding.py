"""Bytes <-> cases: the compact encoding libFuzzer's inputs are made of.

`decode` is total: every byte string is a valid case (out-of-range values
wrap, overlapping regions are dropped, code that does not fit is moved or
cut).  `encode` represents any valid case, and decode(encode(c)) is c
without its name, assembly text and expectations.  `decode_input` also
accepts the readable JSON case files of corpus/, as libFuzzer hands them
over as inputs too.

Layout (little-endian):
    b"SF1"  magic
    u8      number of regions, then per region:
            u8 kind (0 ram, 1 mmio, 2 mmio-kernel) | 0x80 prefault,
            u32 base page (4 KiB), u32 size in pages - 1
    u40     code base
    u8      number of registers, then per register: u8 index (31 = sp), u64 value
    u64     mmio_read
    u8      number of events, then per event: u8 kind (index in EVENT_KINDS), u32 at - 1
    u24     max_steps - 1
    SF2 only, the VMM's side of the conversation and the guest's EL1 state:
    u8      number of SMCCC forwarding ranges, then per range: u32 first, u32 count
    u64     hypercall_result
    u8      nisv policy (index in NISV_POLICIES)
    u8      number of EL1 registers, then per register: u8 index, u64 value
    u8      vectors: 0 none, else 1 + kinds mask; u40 base; per kind u8 count, u32 words
    u32...  instruction words, to the end

SF2 events are u8 when, u8 what, u32 at - 1, then the action's arguments:
set-reg u8 register, u64 value; debug u8 control | sw-bp << 2, u8 count,
u40 per breakpoint; irq-line u8 line | level << 1.
"""
from __future__ import annotations

import json
import struct

from stepfuzz.oracle.case import (DAIF_MASK, DEBUG_CONTROLS, EL1_REG_NAMES, EVENT_RULES, IPA_LIMIT, IRQ_LINES,
                                  MAX_HW_BPS, MAX_INSNS, MAX_RAM, MAX_STEPS_LIMIT, NISV_POLICIES, PAGE, REG_NAMES,
                                  REGION_KINDS, SET_REG_NAMES, SMCCC_FORWARD_MAX, SMCCC_RESERVED, VECTOR_MAX_INSNS,
                                  VECTOR_SLOTS, Case, CaseError, Event, Region, Vectors, loads_case)

from stepfuzz.fuzz.inputs.insns import NOP

MAGIC = b"SF2"
OLD_MAGIC = b"SF1"             # before the conversation: still read
WHENS = tuple(EVENT_RULES)
WHATS = tuple(dict.fromkeys(a for _, acts in EVENT_RULES.values() for a in acts))
VECTOR_KINDS = tuple(VECTOR_SLOTS)
MAX_STEPS_BOUND = 100          # campaigns' default bound on an input's max_steps: no input makes an execution slow
EVENT_KINDS = (("before", "host-irq"), ("after", "host-irq"), ("trap", "signal"),
               ("mmio-exit", "immediate-exit"), ("mmio-exit", "signal"), ("mmio-exit", "preempt"),
               ("stop", "immediate-exit"), ("stop", "signal"), ("stop", "preempt"))
_EVENT_INDEX = {k: i for i, k in enumerate(EVENT_KINDS)}
DEFAULT_CODE = Region(0x10000, 0x10000, "ram", True)


class NotACase(ValueError):
    """A corpus entry that looks like a JSON case file but is not a valid one."""


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> int:
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return int.from_bytes(chunk, "little")      # missing bytes read as zero

    def rest(self) -> bytes:
        return self.data[self.pos:]


def looks_like_json(data: bytes) -> bool:
    return data.lstrip()[:1] == b"{"


def decode_input(data: bytes) -> Case:
    """A corpus entry -> a case: JSON case files as such, anything else via decode().
    Raises NotACase for a file that claims to be a JSON case but is not one."""
    if looks_like_json(data):
        try:
            return loads_case(data.decode("utf-8", "replace"), "<corpus entry>")
        except CaseError as e:
            raise NotACase(str(e)) from None
    return decode(data)


def decode(data: bytes) -> Case:
    """Any bytes -> a valid case."""
    old = data.startswith(OLD_MAGIC)
    r = _Reader(data[len(MAGIC):] if data.startswith(MAGIC) or old else data)
    regions = []
    for _ in range(r.take(1)):
        kind_byte = r.take(1)
        kind = REGION_KINDS[(kind_byte & 0x7F) % len(REGION_KINDS)]
        base = (r.take(4) % (IPA_LIMIT // PAGE)) * PAGE
        size = (r.take(4) % (IPA_LIMIT // PAGE) + 1) * PAGE
        regions.append(Region(base, min(size, IPA_LIMIT - base), kind, bool(kind_byte & 0x80) and kind == "ram"))
    base = (r.take(5) % IPA_LIMIT) & ~3
    regs = {}
    for _ in range(r.take(1)):
        index = r.take(1) % len(REG_NAMES)
        regs[REG_NAMES[index]] = r.take(8)
    mmio_read = r.take(8)
    events = []
    for _ in range(r.take(1)):
        if old:
            when, what = EVENT_KINDS[r.take(1) % len(EVENT_KINDS)]
            events.append(Event(when, r.take(4) % 0xFFFFFFFF + 1, what))
        else:
            events.append(_decode_event(r))
    max_steps = r.take(3) % MAX_STEPS_LIMIT + 1
    extra: dict = {} if old else _decode_extra(r)
    raw = r.rest()
    words = list(struct.unpack_from(f"<{min(len(raw) // 4, MAX_INSNS)}I", raw))
    memory, base, words = _normalise(regions, base, words)
    vectors = extra.pop("vectors", None)
    if vectors is not None and not _vectors_fit(vectors, memory, base, len(words)):
        vectors = None
    if any(m.kind == "mmio-kernel" for m in memory):
        events = [e for e in events if e.what != "irq-line"]   # (the vGIC owns the lines: case.py)
    return Case(base=base, words=tuple(words), regs=tuple((k, regs[k]) for k in REG_NAMES if k in regs),
                memory=tuple(memory), mmio_read=mmio_read, events=tuple(events), max_steps=max_steps,
                vectors=vectors, **extra, source="<fuzz input>")


def _decode_event(r: _Reader) -> Event:
    when = WHENS[r.take(1) % len(WHENS)]
    key, actions = EVENT_RULES[when]
    what = actions[r.take(1) % len(actions)]
    at = r.take(4) % 0xFFFFFFFF + 1
    at = at if key else 0
    if what == "set-reg":
        reg = SET_REG_NAMES[r.take(1) % len(SET_REG_NAMES)]
        value = r.take(8)
        value = value & ~3 if reg == "pc" else value & DAIF_MASK if reg == "daif" else value
        return Event(when, at, what, reg=reg, value=value)
    if what == "debug":
        b = r.take(1)
        control = DEBUG_CONTROLS[(b & 3) % len(DEBUG_CONTROLS)]
        bps = tuple(sorted({(r.take(5) & ~3) for _ in range(r.take(1) % (MAX_HW_BPS + 1))}))
        if control == "off":
            return Event(when, at, what, control=control)
        return Event(when, at, what, control=control, sw_bp=bool(b & 4), hw_bp=bps)
    if what == "irq-line":
        b = r.take(1)
        return Event(when, at, what, line=IRQ_LINES[b & 1], level=(b >> 1) & 1)
    return Event(when, at, what)


def _decode_extra(r: _Reader) -> dict:
    ranges: list[tuple[int, int]] = []
    for _ in range(r.take(1) % (SMCCC_FORWARD_MAX + 1)):
        first, count = r.take(4), r.take(4) + 1
        count = min(count, (1 << 32) - first)
        if any(first <= hi and lo < first + count for lo, hi in SMCCC_RESERVED) or any(
                first < f + c and f < first + count for f, c in ranges):
            continue              # KVM would refuse it
        ranges.append((first, count))
    hypercall_result = r.take(8)
    nisv = NISV_POLICIES[r.take(1) % len(NISV_POLICIES)]
    el1: dict[str, int] = {}
    for _ in range(r.take(1)):
        name = EL1_REG_NAMES[r.take(1) % len(EL1_REG_NAMES)]
        value = r.take(8)
        el1[name] = value & DAIF_MASK if name == "daif" else value & 0xFFFFFFFF if name == "spsr_el1" else value
    vectors = None
    mask = r.take(1)
    if mask:
        vbar = (r.take(5) % IPA_LIMIT) & ~0x7FF
        handlers = []
        for i, kind in enumerate(VECTOR_KINDS):
            if (mask - 1) >> i & 1:
                n = r.take(1) % VECTOR_MAX_INSNS + 1
                handlers.append((kind, tuple(r.take(4) for _ in range(n)), None))
        vectors = Vectors(vbar, tuple(handlers)) if handlers else None
    return {"smccc_forward": tuple(ranges), "hypercall_result": hypercall_result, "nisv": nisv,
            "el1_regs": tuple((k, el1[k]) for k in EL1_REG_NAMES if k in el1), "vectors": vectors}


def _vectors_fit(v: Vectors, memory: list[Region], base: int, n: int) -> bool:
    """The rule case files follow: the table in one ram region, clear of the code."""
    end = v.base + 0x800
    home = next((m for m in memory if m.base <= v.base < m.end), None)
    return home is not None and home.kind == "ram" and end <= home.end and not (v.base < base + 4 * (n + 1) and base < end)


def _normalise(regions: list[Region], base: int, words: list[int]) -> tuple[list[Region], int, list[int]]:
    """Make a decoded memory map valid (no overlaps, bounded RAM, code in RAM),
    keeping the regions in their order."""
    keep: set[int] = set()
    ram, last_end = 0, -1
    for i in sorted(range(len(regions)), key=lambda i: regions[i].base):
        reg = regions[i]
        if reg.base < last_end:
            continue                  # overlaps the region before it
        if reg.kind == "ram":
            if ram + reg.size > MAX_RAM:
                continue
            ram += reg.size
        keep.add(i)
        last_end = reg.end
    kept = [r for i, r in enumerate(regions) if i in keep]
    if not words:
        words = [NOP]
    home = next((k for k in kept if k.kind == "ram" and k.base <= base < k.end and base + 4 * len(words) + 4 <= k.end), None)
    if home is None:
        home = next((k for k in kept if k.kind == "ram" and k.size >= 8), None)
        if home is None:
            home = _free_default(kept, ram)
            kept.append(home)
        base = home.base
        words = words[:(home.size - 4) // 4]
    return kept, base, words


def _free_default(kept: list[Region], ram: int) -> Region:
    """A code region that fits: the default one, else the first free 64 KiB
    slot above it (jumping past each region in the way: a decoded region may
    span most of the address space).  With no slot left, the regions in the
    default place give way to the code."""
    size = DEFAULT_CODE.size if ram + DEFAULT_CODE.size <= MAX_RAM else PAGE
    addr = DEFAULT_CODE.base
    for k in sorted(kept, key=lambda k: k.base):
        if addr < k.end and k.base < addr + size:
            addr = -(-k.end // 0x10000) * 0x10000
    if addr + size > IPA_LIMIT:
        addr = DEFAULT_CODE.base
        kept[:] = [k for k in kept if not (addr < k.end and k.base < addr + size)]
    return Region(addr, size, "ram", True)


def encode(case: Case) -> bytes:
    out = bytearray(MAGIC)
    out += len(case.memory).to_bytes(1, "little")
    for r in case.memory:
        kind = REGION_KINDS.index(r.kind) | (0x80 if r.prefault else 0)
        out += bytes([kind]) + (r.base // PAGE).to_bytes(4, "little") + (r.size // PAGE - 1).to_bytes(4, "little")
    out += case.base.to_bytes(5, "little")
    out += len(case.regs).to_bytes(1, "little")
    for name, value in case.regs:
        out += bytes([REG_NAMES.index(name)]) + value.to_bytes(8, "little")
    out += case.mmio_read.to_bytes(8, "little")
    out += len(case.events).to_bytes(1, "little")
    for e in case.events:
        out += bytes([WHENS.index(e.when), EVENT_RULES[e.when][1].index(e.what)]) + max(e.at - 1, 0).to_bytes(4, "little")
        if e.what == "set-reg":
            out += bytes([SET_REG_NAMES.index(e.reg)]) + e.value.to_bytes(8, "little")
        elif e.what == "debug":
            out += bytes([DEBUG_CONTROLS.index(e.control) | (4 if e.sw_bp else 0), len(e.hw_bp)])
            out += b"".join(a.to_bytes(5, "little") for a in e.hw_bp)
        elif e.what == "irq-line":
            out += bytes([IRQ_LINES.index(e.line) | e.level << 1])
    out += (case.max_steps - 1).to_bytes(3, "little")
    out += len(case.smccc_forward).to_bytes(1, "little")
    for first, count in case.smccc_forward:
        out += first.to_bytes(4, "little") + (count - 1).to_bytes(4, "little")
    out += case.hypercall_result.to_bytes(8, "little")
    out += bytes([NISV_POLICIES.index(case.nisv), len(case.el1_regs)])
    for name, value in case.el1_regs:
        out += bytes([EL1_REG_NAMES.index(name)]) + value.to_bytes(8, "little")
    v = case.vectors
    if v is None:
        out += b"\0"
    else:
        kinds = {k: words for k, words, _ in v.handlers}
        out += bytes([1 + sum(1 << i for i, k in enumerate(VECTOR_KINDS) if k in kinds)]) + v.base.to_bytes(5, "little")
        for k in VECTOR_KINDS:
            if k in kinds:
                out += bytes([len(kinds[k]) - 1]) + b"".join(w.to_bytes(4, "little") for w in kinds[k])
    for w in case.words:
        out += w.to_bytes(4, "little")
    return bytes(out)


def to_json_bytes(case: Case) -> bytes:
    return json.dumps(case.with_words().to_json(), indent=2).encode() + b"\n"
