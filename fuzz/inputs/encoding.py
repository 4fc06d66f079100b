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
    u32...  instruction words, to the end
"""
from __future__ import annotations

import json
import struct

from stepfuzz.oracle.case import (IPA_LIMIT, MAX_INSNS, MAX_RAM, MAX_STEPS_LIMIT, PAGE, REG_NAMES, REGION_KINDS,
                         Case, CaseError, Event, Region, loads_case)

from stepfuzz.fuzz.inputs.insns import NOP

MAGIC = b"SF1"
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
    r = _Reader(data[len(MAGIC):] if data.startswith(MAGIC) else data)
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
        when, what = EVENT_KINDS[r.take(1) % len(EVENT_KINDS)]
        events.append(Event(when, r.take(4) % 0xFFFFFFFF + 1, what))
    max_steps = r.take(3) % MAX_STEPS_LIMIT + 1
    raw = r.rest()
    words = list(struct.unpack_from(f"<{min(len(raw) // 4, MAX_INSNS)}I", raw))
    memory, base, words = _normalise(regions, base, words)
    return Case(base=base, words=tuple(words), regs=tuple((k, regs[k]) for k in REG_NAMES if k in regs),
                memory=tuple(memory), mmio_read=mmio_read, events=tuple(events), max_steps=max_steps,
                source="<fuzz input>")


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
        out += bytes([_EVENT_INDEX[(e.when, e.what)]]) + (e.at - 1).to_bytes(4, "little")
    out += (case.max_steps - 1).to_bytes(3, "little")
    for w in case.words:
        out += w.to_bytes(4, "little")
    return bytes(out)


def to_json_bytes(case: Case) -> bytes:
    return json.dumps(case.with_words().to_json(), indent=2).encode() + b"\n"
