"""Shrink a divergent case while it keeps the same divergence.

A shrinker in the manner of Hypothesis' (internal/conjecture/shrinker.py),
written for cases rather than choice sequences:

* a strict total order on cases, `sort_key`: fewer instructions first, then
  fewer events, regions and registers, then simpler words, earlier events,
  smaller register values, ...  A candidate replaces the current case only if
  it is interesting *and strictly smaller* under that order.  That is what
  makes shrinking terminate: every candidate is built from the current case
  by deleting items or lowering numbers, so the cases it can ever reach form
  a finite set (nothing grows past the original's lengths, no number past
  2^64), and a strictly decreasing sequence in a total order on a finite set
  is finite.  (`max_shrinks` also bounds it outright.)
* a cache of every candidate tried, keyed by its canonical text, so that no
  candidate is ever checked twice, whichever pass builds it again;
* passes that keep their position: after a success a pass carries on from
  the index where it succeeded, not from its first candidate; runs of
  instructions, events, registers are deleted with adaptive chunk sizes
  (try 1, double while it works, then bisect: `find_integer`), and numbers
  are lowered by the same search; the passes run in rounds until a whole
  round makes no progress (a fixpoint);
* statistics per pass (checks spent, cache hits, shrinks, oracle errors,
  time), returned in `Stats` and logged at the end (`stepfuzz minimize -v`);
* bounds on the whole minimization (`max_seconds`, `max_shrinks`,
  `max_checks`); one that stops the shrinker says so (`Stats.stopped`): the
  result is then smaller, but maybe not minimal;
* an exception raised by the oracle for a candidate is counted (per pass and
  in total) and the first few are kept with the candidate's text; the
  candidate counts as not interesting.

What "interesting" means is one function that `minimize` takes as a
parameter: by default `same_root_cause` (the same mechanism and symptom, so
incidental events and traps can go), or `same_divergence` (the same per-era
signature).  Deterministic: no randomness anywhere, the
same case and era give the same result (unless the time bound stops it).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from stepfuzz.oracle.case import DEFAULT_MAX_STEPS, EVENT_RULES, INSN_EVENTS, REG_NAMES, REGION_KINDS, Case
from stepfuzz.oracle.isa import decode
from stepfuzz.oracle.kvm.attribute import SYMPTOM, root_cause_of
from stepfuzz.oracle.kvm.eras import Era
from stepfuzz.oracle.run import Result, check

from stepfuzz.fuzz.inputs.insns import NOP

MAX_SECONDS = 300.0
MAX_SHRINKS = 500
MAX_CHECKS = 20_000
KEPT_ERRORS = 5          # oracle exceptions kept in full (all are counted)


class NotDivergent(ValueError):
    pass


def visible(r) -> bool:
    """Does the divergence show in the stop PCs alone?  A real kernel reports
    PCs, not steps: a reproducer whose extra instruction is a branch to
    itself would look right there."""
    return [s.pc for s in r.model.stops] != r.reference.pcs


# ---------------------------------------------------------------- what is kept

Predicate = Callable[[Result], bool]


def same_divergence(original: Result) -> Predicate:
    """The interestingness test, built from the original case's result: the
    era still diverges with the same signature, and if the original
    divergence shows in the stop PCs, the candidate's does too.  The one
    place that says what a smaller case must keep (swap it to keep, say, the
    mechanism rather than the signature)."""
    signature, keep_visible = original.divergence.signature, visible(original)

    def interesting(r: Result) -> bool:
        return (r.divergence is not None and r.divergence.signature == signature
                and (visible(r) or not keep_visible))
    interesting.signature = signature         # what Stats reports the case shrunk for
    return interesting


def root_of(r: Result) -> str:
    """The root cause signature of a divergent result (attribution runs the era
    a few times more)."""
    return root_cause_of(r).signature


def same_root_cause(original: Result) -> Predicate:
    """The interestingness test campaigns' findings are minimized with: the
    era still diverges with the same root cause -- the mechanism and the
    symptom, not the incidental events of the window, which can therefore be
    dropped -- and visibly in the stop PCs if the original was.  The cheap
    tests come first: most candidates fail them and are never attributed."""
    root, keep_visible = root_of(original), visible(original)
    kind = SYMPTOM.get(original.divergence.kind, original.divergence.kind)

    def interesting(r: Result) -> bool:
        d = r.divergence
        return (d is not None and SYMPTOM.get(d.kind, d.kind) == kind and (visible(r) or not keep_visible)
                and root_of(r) == root)
    interesting.signature = root
    return interesting


# ---------------------------------------------------------------- the order

_WHEN = {w: i for i, w in enumerate(EVENT_RULES)}
_WHAT = {a: i for i, a in enumerate(dict.fromkeys(a for _, acts in EVENT_RULES.values() for a in acts))}
_REG = {r: i for i, r in enumerate(REG_NAMES)}
_KIND = {k: i for i, k in enumerate(REGION_KINDS)}


def size(case: Case) -> tuple[int, int, int, int]:
    """What the passes shrink, most important first."""
    return (len(case.words), len(case.events), len(case.memory), len(case.regs))


def describe(case: Case) -> str:
    n, e, m, r = size(case)
    return f"{n} instructions, {e} events, {m} regions, {r} registers"


def canonical(case: Case) -> str:
    """A case as compact, canonical JSON text (code as words): equal texts,
    equal runs.  The cache key and the order's last tiebreak."""
    return json.dumps(case.with_words().to_json(), sort_keys=True, separators=(",", ":"))


def word_key(w: int) -> tuple[int, int]:
    """NOP is the simplest word; otherwise smaller words are simpler."""
    return (0, 0) if w == NOP else (1, w)


def sort_key(case: Case) -> tuple:
    """A strict total order on cases, shortlex-like: smaller is simpler.  A
    candidate is accepted only if its key is strictly smaller than the current
    case's, so no sequence of shrinks can cycle (see the module docstring)."""
    return (
        size(case),
        tuple(word_key(w) for w in case.words),
        tuple((e.at, _WHEN[e.when], _WHAT[e.what]) for e in case.events),
        tuple(v for _, v in case.regs),
        tuple(_REG[k] for k, _ in case.regs),
        tuple((not r.prefault, _KIND[r.kind], r.base, r.size) for r in case.memory),
        case.mmio_read,
        (case.max_steps != DEFAULT_MAX_STEPS, case.max_steps),
        case.base,
        canonical(case),               # total: equal keys, equal cases
    )


# ---------------------------------------------------------------- statistics

@dataclass
class PassStats:
    name: str
    calls: int = 0        # checks spent (cache misses)
    cached: int = 0       # candidates answered by the cache, no check spent
    shrinks: int = 0      # candidates accepted
    errors: int = 0       # checks that raised
    seconds: float = 0.0


@dataclass(frozen=True)
class OracleError:
    pass_name: str
    error: str            # "Type: message"
    case: str             # the candidate, as case JSON text


@dataclass
class Stats:
    era: str
    signature: str
    keep_visible: bool
    checks: int = 0       # all checks, the original's included
    cache_hits: int = 0
    shrinks: int = 0
    errors: int = 0
    first_errors: list[OracleError] = field(default_factory=list)
    passes: dict[str, PassStats] = field(default_factory=dict)
    rounds: int = 0
    seconds: float = 0.0
    stopped: str = ""     # the bound that stopped the shrinker; "" = it reached a fixpoint

    @property
    def bounded(self) -> bool:
        """Did a bound stop it (the result may then not be minimal)?"""
        return bool(self.stopped)

    def table(self) -> str:
        """Per-pass statistics, as `stepfuzz minimize -v` prints them."""
        rows = [f"  {'pass':<28} {'calls':>6} {'cached':>6} {'shrinks':>7} {'errors':>6} {'time':>8}"]
        for p in self.passes.values():
            rows.append(f"  {p.name:<28} {p.calls:>6} {p.cached:>6} {p.shrinks:>7} {p.errors:>6} {p.seconds:>7.2f}s")
        end = f"stopped by {self.stopped}: the result may not be minimal" if self.stopped \
            else "no pass makes progress: minimal for these passes"
        rows.append(f"  {self.checks} checks, {self.cache_hits} cached, {self.shrinks} shrinks, "
                    f"{self.errors} oracle errors, {self.rounds} rounds, {self.seconds:.2f} s; {end}")
        for e in self.first_errors:
            rows.append(f"  oracle error in {e.pass_name}: {e.error}; candidate: {' '.join(e.case.split())}")
        return "\n".join(rows)


def change(a: Case, b: Case) -> str:
    """What a shrink did, in a few words (the -v log)."""
    if size(a) != size(b):
        return f"{describe(a)} -> {describe(b)}"
    what = [f"insn {i + 1}: {x:#010x} -> {y:#010x}" for i, (x, y) in enumerate(zip(a.words, b.words)) if x != y]
    what += [f"event {i + 1}: {x.when} {x.at} -> {y.at}" for i, (x, y) in enumerate(zip(a.events, b.events)) if x != y]
    what += [f"{k}: {x:#x} -> {y:#x}" for (k, x), (_, y) in zip(a.regs, b.regs) if x != y]
    what += [f"region {x.base:#x}: prefault" for x, y in zip(a.memory, b.memory) if x != y]
    what += [f"{k}: {getattr(a, k)} -> {getattr(b, k)}" for k in ("mmio_read", "max_steps") if getattr(a, k) != getattr(b, k)]
    return ", ".join(what) or "(same)"


class _Stop(Exception):
    """A bound is reached: the shrinker stops where it is."""


# ---------------------------------------------------------------- the shrinker

class Shrinker:
    def __init__(self, case: Case, era: Era, interesting: Predicate, stats: Stats, *,
                 max_seconds: float, max_shrinks: int, max_checks: int,
                 log: Callable[[str], None], on_shrink: Callable[[Case], None] | None):
        self.case, self.key = case, sort_key(case)
        self.era, self.interesting, self.stats, self.log, self.on_shrink = era, interesting, stats, log, on_shrink
        self.deadline = time.monotonic() + max_seconds
        self.max_shrinks, self.max_checks, self.max_seconds = max_shrinks, max_checks, max_seconds
        self.cache: dict[str, bool] = {self.key[-1]: True}
        self.current: PassStats = PassStats("")

    def _test(self, cand: Case, text: str) -> bool:
        """One check of the oracle (never for a cached candidate)."""
        s, p = self.stats, self.current
        if s.shrinks >= self.max_shrinks:
            raise _Stop(f"max_shrinks={self.max_shrinks}")
        if s.checks >= self.max_checks:
            raise _Stop(f"max_checks={self.max_checks}")
        if time.monotonic() >= self.deadline:
            raise _Stop(f"max_seconds={self.max_seconds:g}")
        s.checks += 1
        p.calls += 1
        try:
            (r,) = check(cand, [self.era])
            return bool(self.interesting(r))
        except Exception as e:          # an oracle bug: counted and kept, the candidate is not interesting
            s.errors += 1
            p.errors += 1
            if len(s.first_errors) < KEPT_ERRORS:
                s.first_errors.append(OracleError(p.name, f"{type(e).__name__}: {e}", cand.dumps()))
            return False

    def consider(self, cand: Case) -> bool:
        """Is `cand` interesting?  If it is, and strictly smaller than the
        current case, it becomes the current case.  The current case itself
        counts as interesting (a run of nops replaced by nops); a larger case
        is never checked and counts as not."""
        key = sort_key(cand)
        if key == self.key:
            return True
        if key > self.key:
            # Only strictly smaller cases are ever accepted: that is what
            # guarantees termination (no cycle; see the module docstring).
            return False
        text = key[-1]
        ok = self.cache.get(text)
        if ok is None:
            ok = self.cache[text] = self._test(cand, text)
        else:
            self.stats.cache_hits += 1
            self.current.cached += 1
        if ok:
            self.log(f"  {self.current.name}: {change(self.case, cand)}")
            self.case, self.key = cand, key
            self.stats.shrinks += 1
            self.current.shrinks += 1
            if self.on_shrink:
                self.on_shrink(cand)
        return ok

    def run(self, passes: tuple[tuple[str, Callable[["Shrinker"], None]], ...]) -> None:
        """Rounds of all the passes until one makes no progress (or a bound stops it)."""
        try:
            while True:
                self.stats.rounds += 1
                before = self.stats.shrinks
                for name, shrink_pass in passes:
                    self.current = self.stats.passes.setdefault(name, PassStats(name))
                    t = time.perf_counter()
                    try:
                        shrink_pass(self)
                    finally:
                        self.current.seconds += time.perf_counter() - t
                if self.stats.shrinks == before:
                    return
        except _Stop as stop:
            self.stats.stopped = str(stop)


def find_integer(f: Callable[[int], bool], limit: int) -> int:
    """A large k in 0..limit with f(k) (f(0) is taken as true), searching as
    if f were monotone: try 1, double while f holds, then bisect between the
    last success and the first failure.  One call when k = 0, about
    2 log2(k) otherwise."""
    if limit < 1 or not f(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and f(hi):
        lo, hi = hi, 2 * hi
    if hi > limit:
        if lo == limit or f(limit):
            return limit
        hi = limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if f(mid):
            lo = mid
        else:
            hi = mid
    return lo


def lower(value: int, attempt: Callable[[int], bool], floor: int = 0) -> None:
    """Lower a number toward `floor`, by bisections (`find_integer`): try the
    floor itself and floor + 1; then clear as many low bits as works (an
    address inside a region goes to a round one, often the region's base);
    then shift right as far as works (a large value goes to the smallest
    power of two that will do in a few checks, not 64); then subtract as
    much as works.  Every attempt is with a smaller value than the last that
    worked, and an attempt with the current value costs no check."""
    if value <= floor or attempt(floor) or value == floor + 1 or attempt(floor + 1):
        return
    for smaller in (lambda v, j: v >> j << j, lambda v, j: v >> j):
        j = find_integer(lambda j: smaller(value, j) >= floor + 2 and attempt(smaller(value, j)), value.bit_length())
        value = smaller(value, j)
    find_integer(lambda d: attempt(value - d), value - floor - 2)


def _set(items: tuple, i: int, item) -> tuple:
    return items[:i] + (item,) + items[i + 1:]


# ---------------------------------------------------------------- passes
# Each pass walks the *current* case (s.case), index by index; after a
# success it stays at the same index (the item there is a new one) and moves
# on after a failure.  Candidates a pass builds again are answered by the
# cache: staying put after a deletion costs no check, since deleting the
# next item too was the search's first failure.

def _delete_runs(s: Shrinker, name: str, deletable: Callable[[Case, int], bool] = lambda c, i: True,
                 keep: int = 0, builds: tuple[Callable[[Case, int, int], Case], ...] = ()) -> None:
    """Delete runs of the items in field `name`, adaptively (find_integer).
    `builds`: ways to build the candidate without items[i:i+k], each tried
    (from the same position) when the ones before it delete nothing."""
    builds = builds or (lambda c, i, k: replace(c, **{name: getattr(c, name)[:i] + getattr(c, name)[i + k:]}),)
    i = 0
    while i < len(getattr(s.case, name)):
        base = s.case
        items = getattr(base, name)
        n = 0
        while i + n < len(items) and deletable(base, i + n):
            n += 1
        n = min(n, len(items) - keep)
        if n and any(find_integer(lambda k: s.consider(build(base, i, k)), n) for build in builds):
            continue              # stay here: the item at i is a new one
        i += 1


def _retimed(case: Case, i: int, k: int) -> Case:
    """words[i:i+k] deleted, and the events timed by an instruction after
    them moved with it (those timed by a deleted one go to the next)."""
    def at(e):
        if e.when not in INSN_EVENTS or e.at <= i + 1:
            return e
        return replace(e, at=max(i + 1, e.at - k))
    return replace(case, words=case.words[:i] + case.words[i + k:], events=tuple(at(e) for e in case.events))


def drop_trailing_nops(s: Shrinker) -> None:
    words = s.case.words
    while len(words) > 1 and words[-1] == NOP:
        words = words[:-1]
    s.consider(replace(s.case, words=words))


def _plain(case: Case, i: int, k: int) -> Case:
    """words[i:i+k] deleted, the events left as they are."""
    return replace(case, words=case.words[:i] + case.words[i + k:])


def delete_instructions(s: Shrinker) -> None:
    """Delete runs of instructions, with the events timed by an instruction
    moved along, or if that deletes nothing, left alone (as a shorter
    program may need them: the same candidate when no event is moved, so
    the cache answers it)."""
    _delete_runs(s, "words", keep=1, builds=(_retimed, _plain))


def _delete_blocks(s: Shrinker, name: str, keep: int = 0, build=None) -> None:
    """Delete aligned blocks of the items in field `name`, halving the block
    size from half the items down to 2 (delta debugging's coarse steps): what
    can only go together, such as an instruction and the one that uses its
    result, which deleting runs from the left one by one cannot find.  Run
    after the adaptive deletions, on a case they have already made small."""
    build = build or (lambda c, i, k: replace(c, **{name: getattr(c, name)[:i] + getattr(c, name)[i + k:]}))
    block = len(getattr(s.case, name)) // 2
    while block >= 2:
        i = 0
        while i + block <= len(getattr(s.case, name)):
            if len(getattr(s.case, name)) - block < keep or not s.consider(build(s.case, i, block)):
                i += block
        block //= 2


def delete_instruction_blocks(s: Shrinker) -> None:
    _delete_blocks(s, "words", keep=1, build=_retimed)


def drop_event_blocks(s: Shrinker) -> None:
    _delete_blocks(s, "events")


def drop_events(s: Shrinker) -> None:
    _delete_runs(s, "events")


def drop_regions(s: Shrinker) -> None:
    _delete_runs(s, "memory", deletable=lambda c, i: c.base not in c.memory[i])


def drop_registers(s: Shrinker) -> None:
    _delete_runs(s, "regs")


def nop_instructions(s: Shrinker) -> None:
    """Replace runs of instructions by nops (adaptively, like deletions)."""
    i = 0
    while i < len(s.case.words):
        base = s.case
        if base.words[i] == NOP:
            i += 1
            continue
        n = len(base.words) - i
        find_integer(lambda k: s.consider(replace(base, words=base.words[:i] + (NOP,) * k + base.words[i + k:])), n)
        i += 1


# (mask, value, immediate field): encodings whose immediate can be cleared
# without changing what the instruction is to the hypervisor.  Branches are
# left alone: offset 0 is a branch to itself.
_IMMEDIATES = (
    (0x1F800000, 0x11000000, 0x007FFC00),   # add/sub (immediate): imm12, shift
    (0x1F800000, 0x12800000, 0x007FFFE0),   # movz/movn/movk: imm16, hw
    (0x3B000000, 0x39000000, 0x003FFC00),   # load/store, unsigned offset: imm12
    (0x3B200000, 0x38000000, 0x001FF000),   # load/store, unscaled / pre / post / unprivileged: imm9
    (0x3A000000, 0x28000000, 0x003F8000),   # load/store pair: imm7
    (0xFF000000, 0xD4000000, 0x001FFFE0),   # hvc and other exceptions: imm16
)


def simpler_word(w: int) -> int | None:
    """The same instruction with its immediate cleared, if that keeps its
    class (how the hypervisor sees it); one candidate per word, so cheap."""
    for mask, value, imm in _IMMEDIATES:
        if w & mask == value and w & imm:
            simple = w & ~imm
            a, b = decode(w), decode(simple)
            if (a.kind, a.iss, a.write, a.size, a.rt, a.reg, a.reason) == (b.kind, b.iss, b.write, b.size, b.rt, b.reg, b.reason):
                return simple
            return None
    return None


def simplify_instructions(s: Shrinker) -> None:
    for i in range(len(s.case.words)):
        simple = simpler_word(s.case.words[i])
        if simple is not None:
            s.consider(replace(s.case, words=_set(s.case.words, i, simple)))


def lower_event_times(s: Shrinker) -> None:
    for i in range(len(s.case.events)):
        e = s.case.events[i]
        lower(e.at, lambda at: s.consider(replace(s.case, events=_set(s.case.events, i, replace(e, at=at)))), floor=1)


def lower_registers(s: Shrinker) -> None:
    for i in range(len(s.case.regs)):
        name, value = s.case.regs[i]
        lower(value, lambda v: s.consider(replace(s.case, regs=_set(s.case.regs, i, (name, v)))))


def simplify_memory(s: Shrinker) -> None:
    for i in range(len(s.case.memory)):
        r = s.case.memory[i]
        if r.kind == "ram" and not r.prefault:
            s.consider(replace(s.case, memory=_set(s.case.memory, i, replace(r, prefault=True))))


def simplify_values(s: Shrinker) -> None:
    case = s.case
    if case.max_steps != DEFAULT_MAX_STEPS and len(case.words) + 8 < case.max_steps:
        s.consider(replace(case, max_steps=DEFAULT_MAX_STEPS))
    lower(s.case.mmio_read, lambda v: s.consider(replace(s.case, mmio_read=v)))


PASSES: tuple[tuple[str, Callable[[Shrinker], None]], ...] = (
    ("drop trailing nops", drop_trailing_nops),
    ("delete instructions", delete_instructions),
    ("drop events", drop_events),
    ("delete instruction blocks", delete_instruction_blocks),
    ("drop event blocks", drop_event_blocks),
    ("replace instructions by nop", nop_instructions),
    ("drop memory regions", drop_regions),
    ("drop registers", drop_registers),
    ("simplify instructions", simplify_instructions),
    ("lower event times", lower_event_times),
    ("lower register values", lower_registers),
    ("prefault ram", simplify_memory),
    ("simplify values", simplify_values),
)


PASS_NAMES = tuple(name for name, _ in PASSES)


def minimize(case: Case, era: Era, log: Callable[[str], None] = lambda m: None, *,
             max_seconds: float = MAX_SECONDS, max_shrinks: int = MAX_SHRINKS, max_checks: int = MAX_CHECKS,
             predicate: Callable[[Result], Predicate] = same_root_cause,
             passes: tuple[str, ...] = PASS_NAMES,
             on_shrink: Callable[[Case], None] | None = None) -> tuple[Case, Stats]:
    """The smallest case (by `sort_key`) the passes find that is still
    interesting (`predicate(original result)`), and the statistics.

    `log` gets a line per shrink and, at the end, the statistics table.
    Bounds, on the whole minimization: `max_seconds` (checked between
    checks, never inside one), `max_shrinks`, `max_checks` (the original's
    check included).  `passes`: the names of the passes to run (default all,
    in PASS_NAMES order).  `on_shrink` sees every case accepted, in order."""
    unknown = [p for p in passes if p not in PASS_NAMES]
    if unknown:
        raise ValueError(f"unknown pass {unknown[0]!r} (known: {', '.join(PASS_NAMES)})")
    t = time.perf_counter()
    (r,) = check(case, [era])
    if r.divergence is None:
        raise NotDivergent(f"does not diverge on era {era.id}")
    interesting = predicate(r)
    stats = Stats(era.id, getattr(interesting, "signature", r.divergence.signature), visible(r), checks=1)
    # a smaller case is a new case: what the original was expected to show no longer holds
    case = replace(case, asm=None, expect=())
    s = Shrinker(case, era, interesting, stats, max_seconds=max_seconds, max_shrinks=max_shrinks,
                 max_checks=max_checks, log=log, on_shrink=on_shrink)
    s.run(tuple(p for p in PASSES if p[0] in passes))
    stats.seconds = time.perf_counter() - t
    log(stats.table())
    return s.case, stats
