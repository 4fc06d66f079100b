"""Assembly (keystone) for readable cases and disassembly (capstone) for reports.

Neither is on the fuzzing hot path: generated cases carry instruction words.
"""
from __future__ import annotations

import re
from functools import lru_cache

LABEL_DEF = re.compile(r"^\s*([A-Za-z_.][\w.$]*)\s*:")
NUMERIC_LABEL = re.compile(r"^\s*\d+\s*:|\b\d+[fb]\b")


class AsmError(ValueError):
    pass


@lru_cache(maxsize=1)
def _ks():
    from keystone import KS_ARCH_ARM64, KS_MODE_LITTLE_ENDIAN, Ks
    return Ks(KS_ARCH_ARM64, KS_MODE_LITTLE_ENDIAN)


@lru_cache(maxsize=1)
def _cs():
    from capstone import CS_ARCH_ARM64, CS_MODE_ARM, Cs
    return Cs(CS_ARCH_ARM64, CS_MODE_ARM)


def split_lines(text: str) -> list[str]:
    """Statements of an asm text: newline- or ';'-separated, comments dropped."""
    out = []
    for line in text.replace(";", "\n").splitlines():
        line = line.split("//")[0].strip()
        if line:
            out.append(line)
    return out


DIRECTIVE = re.compile(r"^\s*(\.[A-Za-z]+)\b")
CONDITIONS = ("eq", "ne", "cs", "hs", "cc", "lo", "mi", "pl", "vs", "vc", "hi", "ls", "ge", "lt", "gt", "le", "al", "nv")
# PC-relative forms: mnemonic -> bits of the signed offset and its unit in
# bytes.  keystone aborts the whole process on an offset out of range ("LLVM
# ERROR: fixup value out of range") and silently encodes others wrongly, so
# targets are checked here before it sees them and in its output after.
PC_RELATIVE = {"b": (26, 4), "bl": (26, 4), "cbz": (19, 4), "cbnz": (19, 4), "tbz": (14, 4), "tbnz": (14, 4),
               "adr": (21, 1), "adrp": (21, 4096), "ldr": (19, 4), "ldrsw": (19, 4), "prfm": (19, 4)}
PC_RELATIVE |= {f"b.{c}": (19, 4) for c in CONDITIONS}
NUMBER = re.compile(r"^#?(-?(?:0x[0-9a-f]+|\d+))$", re.I)
DOT = re.compile(r"^\.\s*(?:([+-])\s*(0x[0-9a-f]+|\d+))?$", re.I)


def assemble(text: str, base: int) -> list[int]:
    """Assemble at `base`; raises AsmError naming the offending statement.

    Every statement must give exactly one word: keystone silently drops what
    it does not know (`.inst`, for one), so `.inst` becomes `.word` and other
    directives are refused."""
    from keystone import KsError
    lines = []
    statements = 0
    for line in split_lines(text):
        if not line.isascii():          # keystone takes ASCII only (and raises its own UnicodeEncodeError)
            raise AsmError(f"not ASCII: {line!r}")
        if any(ord(ch) < 32 and ch != "\t" for ch in line) or "\x7f" in line:
            raise AsmError(f"control character in {line!r}")
        if NUMERIC_LABEL.search(line):
            raise AsmError(f"numeric labels are not supported, use named ones: {line!r}")
        body = LABEL_DEF.sub("", line).strip()
        m = DIRECTIVE.match(body)
        if m:
            if m.group(1) not in (".inst", ".word"):
                raise AsmError(f"only .inst and .word directives are supported: {line!r}")
            line = line.replace(".inst", ".word", 1)
        statements += bool(body)
        lines.append(line)
    targets = _branch_targets(lines, base)
    try:
        encoding, _ = _ks().asm("\n".join(lines), base)
    except KsError as e:
        raise AsmError(_first_bad_statement(lines, base) or f"keystone: {e}") from None
    data = bytes(encoding or b"")
    if len(data) != 4 * statements:
        raise AsmError(f"{statements} statements assembled to {len(data)} bytes (keystone skipped something)")
    words = [int.from_bytes(data[i:i + 4], "little") for i in range(0, len(data), 4)]
    for index, (line, target) in targets.items():
        got = _decoded_target(words[index], base + 4 * index)
        if got is not None and got != target:
            raise AsmError(f"keystone assembled {line!r} to refer to {got:#x}, not {target:#x}")
    return words


def _branch_targets(lines: list[str], base: int) -> dict[int, tuple[str, int]]:
    """statement index -> (line, target address) of each PC-relative statement
    whose target is known here; raises AsmError for one out of range or
    misaligned.  A number is an absolute address (keystone's reading)."""
    labels, index = {}, 0
    for line in lines:
        m = LABEL_DEF.match(line)
        if m:
            labels[m.group(1)] = base + 4 * index
        index += bool(LABEL_DEF.sub("", line).strip())
    out, index = {}, 0
    for line in lines:
        body = LABEL_DEF.sub("", line).strip()
        if not body:
            continue
        pc = base + 4 * index
        mnemonic, _, operands = body.partition(" ")
        form = PC_RELATIVE.get(mnemonic.lower())
        operand = operands.rsplit(",", 1)[-1].strip()
        target = _target(operand, labels, pc) if form and operands and "[" not in operands else None
        if target is not None:
            bits, unit = form
            offset = (target & ~0xFFF) - (pc & ~0xFFF) if unit == 4096 else target - pc
            if offset % unit:
                raise AsmError(f"{line!r}: target {target:#x} is not {unit}-byte aligned")
            if not -(1 << (bits - 1)) <= offset // unit < 1 << (bits - 1):
                raise AsmError(f"{line!r}: target {target:#x} is out of range for {mnemonic}")
            out[index] = (line, target & ~0xFFF if unit == 4096 else target)
        index += 1
    return out


def _target(operand: str, labels: dict[str, int], pc: int) -> int | None:
    if operand in labels:
        return labels[operand]
    m = DOT.match(operand)
    if m:
        step = int(m.group(2), 0) if m.group(2) else 0
        return pc + (-step if m.group(1) == "-" else step)
    m = NUMBER.match(operand)
    if m:
        return int(m.group(1), 0) & ((1 << 64) - 1)
    return None


def _decoded_target(word: int, pc: int) -> int | None:
    """The address a PC-relative instruction word refers to, as capstone reads it."""
    cs = _cs_detail()
    for insn in cs.disasm(word.to_bytes(4, "little"), pc):
        imms = [op.imm for op in insn.operands if op.type == 2]      # ARM64_OP_IMM
        return imms[-1] & ((1 << 64) - 1) if imms else None
    return None


@lru_cache(maxsize=1)
def _cs_detail():
    from capstone import CS_ARCH_ARM64, CS_MODE_ARM, Cs
    cs = Cs(CS_ARCH_ARM64, CS_MODE_ARM)
    cs.detail = True
    return cs


def _first_bad_statement(lines: list[str], base: int) -> str | None:
    from keystone import KsError
    labels = {m.group(1) for m in map(LABEL_DEF.match, lines) if m}
    for line in lines:
        body = LABEL_DEF.sub("", line).strip()
        if not body:
            continue
        body = body.replace(".inst", ".word", 1)
        for name in labels:          # a label stands for some address when tried alone
            body = re.sub(rf"(?<![\w.$]){re.escape(name)}(?![\w.$])", hex(base), body)
        try:
            enc, _ = _ks().asm(body, base)
            if not enc:
                raise KsError(0)
        except KsError as e:
            return f"keystone rejects {line!r}: {e}"
    return None


@lru_cache(maxsize=65536)
def disasm(word: int, pc: int) -> str:
    """One instruction as text; words capstone cannot decode show as .inst."""
    for insn in _cs().disasm(word.to_bytes(4, "little"), pc):
        return f"{insn.mnemonic} {insn.op_str}".strip()
    return f".inst 0x{word:08x}"
