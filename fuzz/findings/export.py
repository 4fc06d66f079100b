"""Export cases as C: standalone reproducers and KVM selftests.

Both check the same thing: single-stepping the guest with
KVM_GUESTDBG_SINGLESTEP stops after exactly one instruction each time, at
the PCs of the ideal stepper (the reference), and the run ends as it
should.

- `standalone(cases)`: one self-contained C file, libc and <linux/kvm.h>
  only.  It embeds the VMM core of the real-KVM runner (oracle/realkvm/vmm.c),
  so the reproducer drives KVM exactly as `stepfuzz kvm` does.  Exit 0: every
  stop as expected; 1: a divergence; 2: setup failure.
- `selftest(cases)`: a test for tools/testing/selftests/kvm/arm64/, in the
  style of debug-exceptions.c, using the selftest library: one
  `ksft_test_result` per case, a failing case does not stop the others.

The C is in templates/; the constants it shares with the runner are in
oracle/realkvm/stepfuzz_vmm.h, whose text both exports inline (each is one
file).  No text from a case reaches the C source unescaped: names and
disassembly go through `c_comment`/`c_string`.
"""
from __future__ import annotations

import errno

import re
from dataclasses import dataclass, replace
from importlib import resources

from stepfuzz.oracle.asm import disasm
from stepfuzz.oracle.case import INSN_EVENTS, Case
from stepfuzz.oracle.guest import execute
from stepfuzz.oracle.realkvm.batch import runner_limit
from stepfuzz.oracle.reference import reference
from stepfuzz.oracle.vocabulary import Meets, Outcome

from stepfuzz.oracle.realkvm.vm import VMM_HEADER, VMM_SRC as VMM_SOURCE

# The guest's outcome -> how the VMM ends the run (an ENDED_* of stepfuzz_vmm.h).
EXPORTABLE_ENDINGS = {Outcome.END: "end", Outcome.MAX_STEPS: "max-steps", Outcome.LEFT_CODE: "left-code",
                      Outcome.NO_SYNDROME: "error"}
TIMED = INSN_EVENTS         # a VMM cannot time them


class NotExportable(ValueError):
    pass


def c_comment(text: str) -> str:
    """Printable ASCII only, no way to close the comment early, no trigraphs."""
    clean = "".join(ch if 32 <= ord(ch) < 127 else "." for ch in text)
    return clean.replace("*/", "* /").replace("/*", "/ *").replace("??", "? ?")


def c_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in '\\"':
            out.append("\\" + ch)
        elif 32 <= ord(ch) < 127 and ch != "?":       # '?' would allow trigraphs
            out.append(ch)
        else:
            out.append(f"\\{ord(ch) & 0xFF:03o}")
    return '"' + "".join(out) + '"'


@dataclass
class Expectation:
    case: Case
    pcs: list[int]
    ending: str
    detail: str
    dropped: list[str]          # events a VMM cannot reproduce
    writes: list[int]           # the data of each MMIO write to userspace, as a correct kernel hands it over


def as_reproduced(case: Case) -> Case:
    """The case a reproducer runs: without the events a VMM cannot time."""
    return replace(case, events=tuple(e for e in case.events if e.when not in TIMED))


# The exporters write C for the exit schedule of stepping alone; the
# debugger's own actions (docs/case-format.md, Extensions) are not exported yet.
EXPORTED_ACTIONS = ("immediate-exit", "signal", "preempt")


def expectation(case: Case) -> Expectation:
    limit = runner_limit(as_reproduced(case))
    if limit:
        raise NotExportable(f"a reproducer cannot set it up: {limit}")
    other = sorted({e.what for e in case.events if e.what not in EXPORTED_ACTIONS and e.when not in TIMED}
                   | {e.when for e in case.events if e.when not in ("mmio-exit", "stop", *TIMED)})
    if other or case.smccc_forward or case.el1_regs or case.vectors is not None:
        what = ", ".join(other) or ("smccc_forward" if case.smccc_forward else "regs.daif/EL1 registers"
                                    if case.el1_regs else "vectors")
        raise NotExportable(f"the exporters do not write the VMM's conversation yet ({what}); "
                            "`stepfuzz kvm check` reproduces it on a real kernel")
    log = execute(case)
    ref = reference(log)
    if ref.outcome not in EXPORTABLE_ENDINGS:
        raise NotExportable(f"the guest's run ends with '{ref.outcome}' ({ref.detail}): a reproducer cannot check that")
    dropped = [f"{e.when} insn {e.at}: {e.what}" for e in case.events if e.when in TIMED]
    writes = [s.access.value for i, s in sorted(log.specials.items())     # (instruction i completes by stop i + 1)
              if s.kind == Meets.MMIO and s.access.write and not s.access.kernel and i < len(ref.pcs)]
    return Expectation(case, ref.pcs, EXPORTABLE_ENDINGS[ref.outcome],
                       str(errno.ENOSYS) if ref.outcome == Outcome.NO_SYNDROME else "", dropped, writes)


def _title(case: Case, index: int) -> str:
    return case.name or case.source or f"case {index}"


def _words_c(case: Case, indent: str) -> str:
    return "\n".join(f"{indent}0x{w:08x}, /* {case.base + 4 * i:#x}: {c_comment(disasm(w, case.base + 4 * i))} */"
                     for i, w in enumerate(case.words))


def _events(case: Case) -> list[tuple[str, int, str]]:
    kinds = {"immediate-exit": "DO_IMMEDIATE", "signal": "DO_SIGNAL", "preempt": "DO_PREEMPT"}
    return [("EV_MMIO" if e.when == "mmio-exit" else "EV_STOP", e.at, kinds[e.what])
            for e in as_reproduced(case).events]


def _case_table(exps: list[Expectation]) -> str:
    kinds = {"ram": "R_RAM", "mmio": "R_MMIO", "mmio-kernel": "R_KERNEL"}
    blocks = []
    for i, x in enumerate(exps):
        c = x.case
        regs = dict(c.regs)
        reg_init = ", ".join(f"[{31 if k == 'sp' else int(k[1:])}] = {v:#x}" for k, v in regs.items())
        regions = ", ".join(f"{{ {r.base:#x}, {r.size:#x}, {kinds[r.kind]}, {int(r.prefault)} }}" for r in c.memory)
        evs = _events(c)
        events = ", ".join(f"{{ {w}, {n}, {what} }}" for w, n, what in evs)
        notes = "".join(f"\t\t/* not reproducible from userspace, left out: {c_comment(d)} */\n" for d in x.dropped)
        blocks.append(
            f"\t{{\t/* {c_comment(_title(c, i))} */\n{notes}"
            f"\t\t.name = {c_string(_title(c, i))},\n"
            f"\t\t.base = {c.base:#x}, .max_steps = {c.max_steps}, .mmio_read = {c.mmio_read:#x},\n"
            f"\t\t.regs = {{ {reg_init} }},\n"
            f"\t\t.regions = {{ {regions} }}, .nregions = {len(c.memory)},\n"
            f"\t\t.events = {{ {events} }}, .nevents = {len(evs)},\n"
            f"\t\t.words = (const uint32_t[]){{\n{_words_c(c, chr(9) * 3)}\n\t\t}},\n"
            f"\t\t.nwords = {len(c.words)},\n"
            f"\t\t.expected = (const uint64_t[]){{ {', '.join(f'{pc:#x}' for pc in x.pcs) or '0'} }},\n"
            f"\t\t.nexpected = {len(x.pcs)},\n"
            f"\t\t.writes = (const uint64_t[]){{ {', '.join(f'{v:#x}' for v in x.writes) or '0'} }},\n"
            f"\t\t.nwrites = {len(x.writes)},\n"
            f"\t\t.ending = {c_string(x.ending)}, .ending_detail = {c_string(x.detail)},\n"
            f"\t}},")
    return "\n".join(blocks)


def _check_list(exps: list[Expectation]) -> str:
    return "\n".join(f" *   {i}: {c_comment(_title(x.case, i))}" for i, x in enumerate(exps))


# The C lives in templates/ (package data).  A hole is a line of its own,
# `/* @NAME@ */` (or ` * @NAME@` inside a comment), so each template stays C
# that a C tool can read; `_fill` replaces the whole line.
TEMPLATES = resources.files(__package__) / "templates"
VMM_INCLUDE = '#include "stepfuzz_vmm.h"\n'       # the line of vmm.c the header's text replaces
HOLE = re.compile(r"@[A-Z][A-Z_]*@")
HOLE_LINE = re.compile(r"^(?:/\* @([A-Z][A-Z_]*)@ \*/| \* @([A-Z][A-Z_]*)@)\n", re.M)


def template(name: str) -> str:
    return (TEMPLATES / name).read_text()


def _fill(text: str, holes: dict[str, str]) -> str:
    """Every hole of `text` filled, in one pass: what goes in (case text too) is never searched for holes."""
    found = [m.group(1) or m.group(2) for m in HOLE_LINE.finditer(text)]
    if sorted(found) != sorted(holes) or HOLE.search(HOLE_LINE.sub("", text)):
        raise ValueError(f"the template's holes {found} are not {sorted(holes)}")

    def value(m: re.Match[str]) -> str:
        v = holes[m.group(1) or m.group(2)]
        return v if not v or v.endswith("\n") else v + "\n"
    return HOLE_LINE.sub(value, text)


def vmm_core() -> str:
    """vmm.c with stepfuzz_vmm.h inlined where it includes it: one file, libc and <linux/kvm.h> only."""
    core = VMM_SOURCE.read_text()
    if core.count(VMM_INCLUDE) != 1:
        raise ValueError(f"{VMM_SOURCE} does not include stepfuzz_vmm.h exactly once")
    return core.replace(VMM_INCLUDE, VMM_HEADER.read_text())


def _case_table_c(exps: list[Expectation]) -> str:
    return _fill(template("case_table.c"), {"CASES": _case_table(exps)})


def standalone(cases: list[Case]) -> str:
    exps = [expectation(c) for c in cases]
    return _fill(template("standalone.c"),
                 {"LIST": _check_list(exps), "VMM": vmm_core(), "CASE_TABLE": _case_table_c(exps)})


def selftest(cases: list[Case]) -> str:
    """The header's text goes in whole: the selftest is one file in the kernel tree."""
    exps = [expectation(c) for c in cases]
    return _fill(template("selftest.c"),
                 {"LIST": _check_list(exps), "STEPFUZZ_VMM_H": VMM_HEADER.read_text(),
                  "CASE_TABLE": _case_table_c(exps)})
