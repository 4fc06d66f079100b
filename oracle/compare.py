"""The comparator: reference trace vs model trace -> the first divergence."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

from .guest import ExecLog
from .trace import RefTrace, Stop, Trace
from .vocabulary import Completion, DivergenceKind, Trap, is_completion
TRAPS = frozenset(Trap)
HARMLESS = ("irq",)      # an interrupt taken while the step is active-not-pending



@dataclass(frozen=True)
class Divergence:
    era: str
    kind: DivergenceKind
    stop: int                     # index of the first stop that differs (or the end)
    cause: str                    # what happened in that window: traps and events
    expected: Stop | None         # the reference's stop there
    got: Stop | None              # the model's stop there
    detail: str = ""

    @property
    def signature(self) -> str:
        """Stable across runs and cases: era, kind and cause, never PCs or counts."""
        return f"{self.era}/{self.kind}/{self.cause}"

    @property
    def sig_id(self) -> str:
        return _sig_id(self.signature)

    @property
    def title(self) -> str:
        what = {DivergenceKind.ZERO_STEP: "a stop with no instruction stepped",
                DivergenceKind.MULTI_STEP: f"{self.got.steps if self.got else '?'} instructions in one step",
                DivergenceKind.SKIPPED: "an instruction skipped without running",
                DivergenceKind.PC_MISMATCH: "a stop at the wrong PC",
                DivergenceKind.MISSING_STOP: "a missing stop", DivergenceKind.EXTRA_STOP: "an extra stop",
                DivergenceKind.STOP_KIND: "a stop of the wrong kind",
                DivergenceKind.OUTCOME: "a different run ending", DivergenceKind.STATE: "a different final guest state"}[self.kind]
        return f"{self.era}: {what} after {self.cause.replace('+', ' + ')}"

    def to_json(self) -> dict:
        return {"kind": self.kind, "stop": self.stop, "signature": self.signature,
                "id": self.sig_id, "cause": self.cause, "title": self.title,
                "expected": _stop_json(self.expected), "got": _stop_json(self.got),
                **({"detail": self.detail} if self.detail else {})}


@lru_cache(maxsize=4096)   # campaigns ask for it several times per divergence, of few signatures
def _sig_id(signature: str) -> str:
    return hashlib.sha1(signature.encode()).hexdigest()[:12]


def _stop_json(s: Stop | None) -> dict | None:
    return None if s is None else {"pc": s.pc, "steps": s.steps, "isv": s.isv, "ec": s.ec}


@lru_cache(maxsize=4096)   # a pure function of a short tuple; campaigns meet the same few often
def _cause(why: tuple[str, ...]) -> str:
    """What made a window go wrong, from its record of traps, events and completions.

    A window should complete one instruction.  If it completed none (a faked
    step), the exit that ended it is the cause.  Otherwise the cause is what
    happened from the trap that completed the first instruction (if KVM
    completed it) up to the next completion (or the run's end), leaving out
    the next instruction's own traps: what came before, such as the stage-2
    fault that fetched the first instruction, played no part."""
    why = tuple(w for w in why if w not in HARMLESS)
    marks = [i for i, w in enumerate(why) if is_completion(w)]
    if not marks:
        tokens = [w for w in why if w in TRAPS][-1:] or list(why[-1:])
    else:
        first = start = marks[0]
        tokens = []
        if why[first] != Completion.NATIVE:
            traps = [i for i in range(first) if why[i] in TRAPS]
            if traps:
                start = traps[-1]
                tokens = [why[start]]
        end = marks[1] if len(marks) > 1 else len(why)
        tokens += [w for w in why[start + 1:end] if w not in TRAPS and not is_completion(w)]
    return "+".join(sorted(set(tokens))) or "plain"


def compare(ref: RefTrace, model: Trace, era: str, log: ExecLog | None = None,
            ref_log: ExecLog | None = None) -> Divergence | None:
    """The first way `model` (over `log`) differs from the reference (over
    `ref_log`, when the era emulates differently from the architecture)."""
    first_skip = min(i for i, _ in model.skipped) if model.skipped else None
    stops = model.stops
    for i in range(model.agreed, min(len(ref.pcs), len(stops))):
        pc, got = ref.pcs[i], stops[i]
        want = ref.steps_at(i)
        if got.steps == want and got.pc == pc and got.ec == ref.ec_at(i):
            continue
        if first_skip is not None and first_skip <= i:
            kind = DivergenceKind.SKIPPED
        elif got.steps < want:
            kind = DivergenceKind.ZERO_STEP if got.steps == 0 else DivergenceKind.PC_MISMATCH
        elif got.steps > want:
            kind = DivergenceKind.MULTI_STEP
        elif got.pc != pc:
            kind = DivergenceKind.PC_MISMATCH
        else:
            kind = DivergenceKind.STOP_KIND
        return Divergence(era, kind, i, _cause(got.why), ref.stop_at(i), got)
    n = min(len(ref.pcs), len(stops))
    if len(stops) != len(ref.pcs):
        if len(stops) > n:
            got = stops[n]
            # a surplus stop that stepped nothing (or several) is that bug, at the end of the run
            kind = (DivergenceKind.ZERO_STEP if got.steps == 0 else
                    DivergenceKind.MULTI_STEP if got.steps > 1 else DivergenceKind.EXTRA_STOP)
            return Divergence(era, kind, n, _cause(got.why), None, got)
        return Divergence(era, DivergenceKind.MISSING_STOP, n, _cause(model.tail_why + (model.outcome,)),
                          ref.stop_at(n), None, detail=model.detail)
    if model.outcome != ref.outcome:
        return Divergence(era, DivergenceKind.OUTCOME, n, f"{ref.outcome}-vs-{model.outcome}", None, None,
                          detail=model.detail)
    ref_log = ref_log or log
    if (model.final_regs is not None or ref.final_regs is not None or ref_log is not log) and log is not None:
        want = ref.final_regs or ref_log.final_regs()
        got = model.final_regs or log.final_regs()
        if got == want:
            return None
        diff = sorted(k for k, v in got.items() if want[k] != v)
        return Divergence(era, DivergenceKind.STATE, n, "skip" if model.skipped else "emulation", None, None,
                          detail="registers differ: " + ", ".join(diff))
    return None
