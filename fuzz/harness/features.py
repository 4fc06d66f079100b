"""Behaviour features for libFuzzer: new stop behaviours look like new coverage.

atheris only sees Python coverage.  `observe()` hashes what a stop looked
like (era, the traps and events behind it, steps, ISV) into one of 1024
buckets and walks decision trees with 1024 distinct leaves to it, so a
behaviour never seen before is a branch never taken before: libFuzzer keeps
the input.  The trees are generated at import; the harness instruments them.
"""
from __future__ import annotations

import zlib

from stepfuzz.oracle.run import Result
from stepfuzz.oracle.vocabulary import Completion

DEPTH = 10
SPLIT = 5          # 2**SPLIT small trees of depth DEPTH - SPLIT: cheap to instrument


def _tree_source(name: str, depth: int) -> str:
    lines = [f"def {name}(h):"]

    def node(bit: int, indent: int, value: int) -> None:
        pad = "    " * indent
        if bit == depth:
            lines.append(f"{pad}return {value}")
            return
        lines.append(f"{pad}if h & {1 << bit}:")
        node(bit + 1, indent + 1, value | (1 << bit))
        lines.append(f"{pad}else:")
        node(bit + 1, indent + 1, value)

    node(0, 1, 0)
    return "\n".join(lines) + "\n"


_namespace: dict = {}
exec(compile("".join(_tree_source(f"tree{i}", DEPTH - SPLIT) for i in range(1 << SPLIT)),
             "<stepfuzz-features>", "exec"), _namespace)
TREES = tuple(_namespace[f"tree{i}"] for i in range(1 << SPLIT))


def bucket(h: int) -> int:
    return TREES[(h >> (DEPTH - SPLIT)) & ((1 << SPLIT) - 1)](h)


_KEYS: dict[tuple, int] = {}
PLAIN = (Completion.NATIVE,)     # an ordinary stop: nothing to learn from it


def _new_key(k: tuple[str, tuple[str, ...], int, int]) -> int:
    era, why, steps, hsr = k
    if len(_KEYS) > 20_000:       # a cache: keep memory bounded in long campaigns (~5 MB)
        _KEYS.clear()
    isv = (hsr >> 24) & 1
    h = _KEYS[k] = zlib.crc32(f"{era}|{'+'.join(sorted(set(why)))}|{min(steps, 3)}|{isv}".encode())
    return h


def behaviours(results: list[Result]) -> set[int]:
    """The behaviour features of one execution (its results as the harness
    gets them): each kind of stop per era that is not an ordinary one, and
    each divergence signature."""
    keys = set()
    known = _KEYS.get
    for r in results:
        era = r.era.id
        for _pc, steps, hsr, _exits, why in r.model.stops:     # (the hot loop of this module)
            if steps != 1 or why != PLAIN:
                k = (era, why, steps, hsr)
                h = known(k)
                keys.add(_new_key(k) if h is None else h)
        if r.divergence is not None:
            keys.add(zlib.crc32(r.divergence.signature.encode()))
    return keys


def observe(results: list[Result]) -> None:
    """One execution's behaviours, each walked once: a behaviour is news or
    not, how often one input repeats it is not (and walking each repeat
    costs more than the rest of this module)."""
    for h in behaviours(results):
        bucket(h)
