"""Structure-aware mutation and crossover for libFuzzer (via atheris).

Inputs are decoded into cases, changed at the level of instructions, events,
registers and memory regions, and encoded back.  A share of mutations is
left to libFuzzer's own byte mutators, which the encoding tolerates.
"""
from __future__ import annotations

import random
from dataclasses import replace
from typing import Callable

from stepfuzz.oracle.case import IPA_LIMIT, PAGE, REG_NAMES, Case, Region
from stepfuzz.oracle.isa import MASK64

from stepfuzz.fuzz.inputs import generate as G
from stepfuzz.fuzz.inputs.encoding import NotACase, decode, decode_input, encode

MAX_WORDS = 256
BYTE_LEVEL_SHARE = 0.1
FRESH_SHARE = 0.2        # a freshly generated case now and then: keeps the search near the generator's distribution


def insert_snippet(rnd: random.Random, case: Case) -> Case:
    w = list(case.words)
    at = rnd.randint(0, len(w))
    snippet = (G.exit_snippet(rnd) if rnd.random() < 0.5 else G.control_snippet(rnd)
               if rnd.random() < 0.5 else G.alu(rnd))
    return replace(case, words=tuple(w[:at] + snippet + w[at:]))


def delete_chunk(rnd: random.Random, case: Case) -> Case:
    w = list(case.words)
    if len(w) <= 1:
        return case
    at = rnd.randrange(len(w))
    n = rnd.randint(1, max(1, min(4, len(w) - 1)))
    return replace(case, words=tuple(w[:at] + w[at + n:]) or (w[0],))


def replace_insn(rnd: random.Random, case: Case) -> Case:
    w = list(case.words)
    at = rnd.randrange(len(w))
    w[at] = rnd.choice((G.exit_snippet, G.alu))(rnd)[-1]
    return replace(case, words=tuple(w))


def swap_insns(rnd: random.Random, case: Case) -> Case:
    w = list(case.words)
    i, j = rnd.randrange(len(w)), rnd.randrange(len(w))
    w[i], w[j] = w[j], w[i]
    return replace(case, words=tuple(w))


def flip_bits(rnd: random.Random, case: Case) -> Case:
    w = list(case.words)
    at = rnd.randrange(len(w))
    w[at] ^= 1 << rnd.randrange(32)
    return replace(case, words=tuple(w))


def mutate_events(rnd: random.Random, case: Case) -> Case:
    ev = list(case.events)
    r = rnd.random()
    if ev and r < 0.3:
        ev.pop(rnd.randrange(len(ev)))
    elif ev and r < 0.6:
        i = rnd.randrange(len(ev))
        e = ev[i]
        if e.at:                          # (`start` events count nothing)
            ev[i] = replace(e, at=max(1, e.at + rnd.choice((-2, -1, 1, 2))))
    else:
        ev.append(G.event(rnd, len(case.words), case.base))
    return replace(case, events=tuple(ev[:8]))


def mutate_registers(rnd: random.Random, case: Case) -> Case:
    regs = dict(case.regs)
    name = rnd.choice([f"x{i}" for i in range(31)] + ["sp"])
    regs[name] = rnd.choice((0, 1, rnd.getrandbits(64), G.DATA, G.DATA2, G.MMIO, G.GICD_RAZ, G.CODE_BASE,
                             regs.get(name, 0) + rnd.choice((-8, 8, 0x1000)))) & MASK64
    return replace(case, regs=tuple((k, regs[k]) for k in REG_NAMES if k in regs))


def mutate_memory(rnd: random.Random, case: Case) -> Case:
    mem = list(case.memory)
    i = rnd.randrange(len(mem))
    r = mem[i]
    choice = rnd.random()
    if choice < 0.5 and r.kind == "ram":
        mem[i] = replace(r, prefault=not r.prefault)
    elif choice < 0.7 and (r.end <= case.base or r.base >= case.end + 4):     # not the code's region
        mem[i] = replace(r, kind=rnd.choice(("ram", "mmio", "mmio-kernel")), prefault=False)
    elif choice < 0.85:
        mem[i] = replace(r, size=max(PAGE, r.size + rnd.choice((-PAGE, PAGE))))
    else:
        mem.append(Region(rnd.randrange(0x100, 0x1000) * 0x10000, PAGE * rnd.randint(1, 4),
                          rnd.choice(("ram", "mmio", "mmio-kernel")), rnd.random() < 0.5))
    # re-validated by the round trip through the total encoding
    return decode(encode(replace(case, memory=tuple(mem))))


def mutate_misc(rnd: random.Random, case: Case) -> Case:
    r = rnd.random()
    if r < 0.4:
        return replace(case, mmio_read=G.mmio_value(rnd))
    if r < 0.7:
        return replace(case, max_steps=rnd.choice((16, 64, 200, 400)))
    shift = rnd.choice((-4, 4, 0x1000 - 4 * rnd.randint(1, 8)))
    return decode(encode(replace(case, base=((case.base + shift) % IPA_LIMIT) & ~3)))


MUTATIONS: tuple[tuple[Callable[[random.Random, Case], Case], int], ...] = (
    (insert_snippet, 6), (delete_chunk, 3), (replace_insn, 4), (swap_insns, 2), (flip_bits, 1),
    (mutate_events, 5), (mutate_registers, 2), (mutate_memory, 2), (mutate_misc, 1))
_FUNCS = [f for f, _ in MUTATIONS]
_WEIGHTS = [w for _, w in MUTATIONS]


def mutate_case(rnd: random.Random, case: Case) -> Case:
    for _ in range(rnd.choice((1, 1, 1, 2, 3))):
        case = rnd.choices(_FUNCS, _WEIGHTS)[0](rnd, case)
    if len(case.words) > MAX_WORDS:
        case = replace(case, words=case.words[:MAX_WORDS])
    return case


_PARENTS: dict[bytes, Case] = {}      # decoded corpus entries: libFuzzer picks the same ones again and again
_PARENTS_MAX = 2048


def _start(data: bytes, rnd: random.Random) -> Case:
    """The case to mutate: the input's, or a generated one for libFuzzer's
    empty first input and for a broken JSON seed."""
    case = _PARENTS.get(data)
    if case is not None:
        return case
    if data:
        try:
            case = decode_input(data)
        except NotACase:
            return G.generate(rnd)
        if len(_PARENTS) >= _PARENTS_MAX:
            _PARENTS.clear()
        _PARENTS[data] = case             # cases are immutable: sharing one is safe
        return case
    return G.generate(rnd)


def _fit(case: Case, max_size: int) -> bytes:
    data = encode(case)
    if len(data) > max_size:
        keep = max(1, len(case.words) - (len(data) - max_size + 3) // 4)
        data = encode(replace(case, words=case.words[:keep]))[:max_size]
    return data


def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    r = rnd.random()
    if r < BYTE_LEVEL_SHARE:
        import atheris
        return atheris.Mutate(data, max_size)
    if r < BYTE_LEVEL_SHARE + FRESH_SHARE:
        return _fit(G.generate(rnd), max_size)
    return _fit(mutate_case(rnd, _start(data, rnd)), max_size)


def crossover(rnd: random.Random, a: Case, b: Case) -> Case:
    """The head of a's program and the tail of b's, with some of both's events."""
    i, j = rnd.randint(0, len(a.words)), rnd.randint(0, len(b.words))
    words = a.words[:i] + b.words[j:] or a.words
    events = tuple(rnd.sample(a.events + b.events, min(len(a.events + b.events), rnd.randint(0, 4))))
    return replace(a, words=words[:MAX_WORDS], events=events)


def custom_crossover(data1: bytes, data2: bytes, max_size: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    a, b = _start(data1, rnd), _start(data2, rnd)
    return _fit(crossover(rnd, a, b), max_size)
