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

# when -> (trigger key, allowed actions)
EVENT_RULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "before": ("insn", ("host-irq",)),
    "after": ("insn", ("host-irq",)),
    "trap": ("insn", ("signal",)),
    "mmio-exit": ("n", ("immediate-exit", "signal", "preempt")),
    "stop": ("n", ("immediate-exit", "signal", "preempt")),
}
# events timed by a guest instruction (the others by the VMM's own count of exits/stops)
INSN_EVENTS = tuple(when for when, (key, _) in EVENT_RULES.items() if key == "insn")

TOP_FIELDS = ("stepfuzz", "name", "code", "regs", "memory", "mmio_read",
              "events", "max_steps", "expect")
# `expect` (optional): what a seed case is known to show, era -> "agree" or a
# divergence kind; tests and `stepfuzz run` check it.
EXPECT_VALUES = ("agree", *DivergenceKind)


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
    at: int                   # the `insn` or `n` value (1-based)
    what: str

    def to_json(self) -> dict[str, Any]:
        return {"when": self.when, EVENT_RULES[self.when][0]: self.at, "what": self.what}


@dataclass(frozen=True)
class Case:
    base: int
    words: tuple[int, ...]            # the guest code, one 32-bit word per instruction
    regs: tuple[tuple[str, int], ...] = ()
    memory: tuple[Region, ...] = ()
    mmio_read: int = 0
    events: tuple[Event, ...] = ()
    max_steps: int = DEFAULT_MAX_STEPS
    name: str = ""
    asm: str | None = None            # the source text, when the case was written in assembly
    expect: tuple[tuple[str, str], ...] = ()
    source: str = field(default="<case>", compare=False)

    @cached_property
    def end(self) -> int:
        """The address where the run ends: just past the last instruction."""
        return self.base + 4 * len(self.words)

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
        if self.regs:
            out["regs"] = {k: hex(v) for k, v in self.regs}
        out["memory"] = [
            {"base": hex(r.base), "size": hex(r.size), "kind": r.kind,
             **({"prefault": True} if r.prefault else {})}
            for r in self.memory]
        if self.mmio_read:
            out["mmio_read"] = hex(self.mmio_read)
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

    regs_in = _obj(top.get("regs", {}), src, "regs", REG_NAMES)
    regs = tuple((k, _num(regs_in[k], src, f"regs.{k}")) for k in REG_NAMES if k in regs_in)

    memory = tuple(_parse_region(r, src, i) for i, r in enumerate(_list(top.get("memory", []), src, "memory")))
    _check_memory(memory, base, len(words), src)

    mmio_read = _num(top.get("mmio_read", 0), src, "mmio_read")
    events = tuple(_parse_event(e, src, i) for i, e in enumerate(_list(top.get("events", []), src, "events")))
    max_steps = _num(top.get("max_steps", DEFAULT_MAX_STEPS), src, "max_steps")
    if not 1 <= max_steps <= MAX_STEPS_LIMIT:
        raise CaseError(src, "max_steps", f"{max_steps} is outside 1..{MAX_STEPS_LIMIT}")
    expect = _parse_expect(top.get("expect", {}), src)
    return Case(base=base, words=words, regs=regs, memory=memory, mmio_read=mmio_read,
                events=events, max_steps=max_steps, name=name, asm=asm_text, expect=expect,
                source=src)


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
    _obj(value, src, where, ("when", key, "what"))
    if key not in value:
        raise CaseError(src, f"{where}.{key}", f"missing (a '{when}' event counts {key})")
    at = _num(value[key], src, f"{where}.{key}", bits=32)
    if at < 1:
        raise CaseError(src, f"{where}.{key}", "counts from 1")
    what = value.get("what")
    if not isinstance(what, str) or what not in actions:
        raise CaseError(src, f"{where}.what", f"{_show(what)} cannot happen at '{when}' (allowed: {', '.join(actions)})")
    return Event(when, at, what)


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
