"""Shrink a divergent case while it keeps the same divergence signature.

Small named passes in the spirit of delta debugging, applied until none
makes progress: drop events, drop chunks of instructions, turn instructions
into nops, drop unused memory regions and registers, simplify values.  A
candidate is kept only if the era still diverges with the same signature.
Deterministic: no randomness anywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator

from oracle.case import DEFAULT_MAX_STEPS, Case
from oracle.kvm.eras import Era
from oracle.run import check

from .insns import NOP


class NotDivergent(ValueError):
    pass


def visible(r) -> bool:
    """Does the divergence show in the stop PCs alone?  A real kernel reports
    PCs, not steps: a reproducer whose extra instruction is a branch to
    itself would look right there."""
    return [s.pc for s in r.model.stops] != r.reference.pcs


@dataclass
class Minimizer:
    era: Era
    signature: str
    keep_visible: bool = True
    checks: int = 0

    def interesting(self, case: Case) -> bool:
        self.checks += 1
        try:
            (r,) = check(case, [self.era])
        except Exception:
            return False
        return (r.divergence is not None and r.divergence.signature == self.signature
                and (visible(r) or not self.keep_visible))


def size(case: Case) -> tuple[int, int, int, int]:
    """What the passes shrink, most important first."""
    return (len(case.words), len(case.events), len(case.memory), len(case.regs))


def describe(case: Case) -> str:
    n, e, m, r = size(case)
    return f"{n} instructions, {e} events, {m} regions, {r} registers"


# ---------------------------------------------------------------- passes

def drop_events(case: Case) -> Iterator[Case]:
    for i in range(len(case.events)):
        yield replace(case, events=case.events[:i] + case.events[i + 1:])


def drop_instruction_chunks(case: Case) -> Iterator[Case]:
    n = len(case.words)
    chunk = n // 2
    while chunk >= 1:
        for start in range(0, n, chunk):
            words = case.words[:start] + case.words[start + chunk:]
            if words:
                yield replace(case, words=words)
        chunk //= 2


def nop_instructions(case: Case) -> Iterator[Case]:
    for i, w in enumerate(case.words):
        if w != NOP:
            yield replace(case, words=case.words[:i] + (NOP,) + case.words[i + 1:])


def drop_regions(case: Case) -> Iterator[Case]:
    for i, r in enumerate(case.memory):
        if not r.base <= case.base < r.end:
            yield replace(case, memory=case.memory[:i] + case.memory[i + 1:])


def drop_registers(case: Case) -> Iterator[Case]:
    for i in range(len(case.regs)):
        yield replace(case, regs=case.regs[:i] + case.regs[i + 1:])


def simplify_values(case: Case) -> Iterator[Case]:
    if case.mmio_read:
        yield replace(case, mmio_read=0)
    for i, r in enumerate(case.memory):
        if r.kind == "ram" and not r.prefault:
            yield replace(case, memory=case.memory[:i] + (replace(r, prefault=True),) + case.memory[i + 1:])
    if case.max_steps != DEFAULT_MAX_STEPS and len(case.words) + 8 < case.max_steps:
        yield replace(case, max_steps=DEFAULT_MAX_STEPS)
    for i, e in enumerate(case.events):
        if e.at > 1:
            yield replace(case, events=case.events[:i] + (replace(e, at=e.at - 1),) + case.events[i + 1:])
    for i, (name, value) in enumerate(case.regs):
        for simpler in (0, 1):
            if value > 1:
                yield replace(case, regs=case.regs[:i] + ((name, simpler),) + case.regs[i + 1:])


def drop_trailing_nops(case: Case) -> Iterator[Case]:
    words = case.words
    while len(words) > 1 and words[-1] == NOP:
        words = words[:-1]
    if words != case.words:
        yield replace(case, words=words)


PASSES: tuple[tuple[str, Callable[[Case], Iterator[Case]]], ...] = (
    ("drop events", drop_events),
    ("drop instruction chunks", drop_instruction_chunks),
    ("replace instructions by nop", nop_instructions),
    ("drop trailing nops", drop_trailing_nops),
    ("drop memory regions", drop_regions),
    ("drop registers", drop_registers),
    ("simplify values", simplify_values),
)


def minimize(case: Case, era: Era, log: Callable[[str], None] = lambda m: None) -> tuple[Case, Minimizer]:
    (r,) = check(case, [era])
    if r.divergence is None:
        raise NotDivergent(f"does not diverge on era {era.id}")
    m = Minimizer(era, r.divergence.signature, keep_visible=visible(r))
    # a smaller case is a new case: what the original was expected to show no longer holds
    case = replace(case, asm=None, expect=())
    progress = True
    while progress:
        progress = False
        for name, candidates in PASSES:
            # restart the pass after every success: its candidates depend on the case
            again = True
            while again:
                again = False
                for cand in candidates(case):
                    if size(cand) > size(case) or cand == case:
                        continue
                    if m.interesting(cand):
                        log(f"  {name}: {describe(case)} -> {describe(cand)}")
                        case, again, progress = cand, True, True
                        break
    return case, m
