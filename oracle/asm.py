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
    try:
        encoding, _ = _ks().asm("\n".join(lines), base)
    except KsError as e:
        raise AsmError(_first_bad_statement(lines, base) or f"keystone: {e}") from None
    data = bytes(encoding or b"")
    if len(data) != 4 * statements:
        raise AsmError(f"{statements} statements assembled to {len(data)} bytes (keystone skipped something)")
    return [int.from_bytes(data[i:i + 4], "little") for i in range(0, len(data), 4)]


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
