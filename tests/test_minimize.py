"""The shrinker: its order, its cache, each pass's cost, its bounds, and oracle errors."""
import json
from dataclasses import replace

import pytest

from conftest import CODE, CORPUS, DATA, MMIO, make, padded_6_1_case, stepfuzz
from stepfuzz.fuzz.findings import minimize as M
from stepfuzz.fuzz.findings.minimize import (NotDivergent, find_integer, lower, same_divergence,
                                             simpler_word, sort_key, visible)
from stepfuzz.fuzz.inputs import insns as I
from stepfuzz.oracle.case import Event, load_case, parse_case
from stepfuzz.oracle.kvm.eras import ERAS
from stepfuzz.oracle.run import check

X2 = {"x2": "0x20000000"}
IMMEDIATE_EXIT = {"when": "mmio-exit", "n": 1, "what": "immediate-exit"}
CORE = "ldr x1, [x2]\nadd x0, x0, #1\n"          # the 6.1 bug: an MMIO load, the instruction after it
SIG_6_1 = "6.1/multi-step/immediate-exit+mmio"
KERNEL_MMIO = {"base": "0x8000000", "size": "0x10000", "kind": "mmio-kernel"}
KNOWN = sorted((CORPUS / "known").glob("*.json"))


def minimize(case, era, **kw):
    """These tests are about the shrinker's mechanics, on the per-era
    signature; campaigns' findings keep their root cause (tested last)."""
    kw.setdefault("predicate", same_divergence)
    return M.minimize(case, era, **kw)


def case_6_1(asm=CORE, regs=X2, memory=(CODE, MMIO), events=(IMMEDIATE_EXIT,), **extra):
    return parse_case(make(asm, regs=regs, memory=memory, events=events, **extra))


def signature(case, era="6.1"):
    (r,) = check(case, [ERAS[era]])
    return r.divergence.signature if r.divergence else None


def one_pass(case, name, era="6.1", **kw):
    small, stats = minimize(case, ERAS[era], passes=(name,), **kw)
    assert signature(small, era) == stats.signature
    return small, stats.passes[name], stats


class Counting:
    """A predicate factory that records every candidate the oracle judged."""

    def __init__(self):
        self.seen = []

    def __call__(self, original):
        test = same_divergence(original)

        def interesting(r):
            self.seen.append(M.canonical(r.case))
            return test(r)
        return interesting


# ---------------------------------------------------------------- the order

def test_sort_key_is_shortlex_and_total():
    base = case_6_1()
    simpler = [
        (replace(base, words=base.words[:1]), base),                                  # fewer instructions
        (replace(base, events=()), replace(base, events=base.events * 2)),              # fewer events
        (replace(base, memory=base.memory[:1]), base),                                 # fewer regions
        (replace(base, regs=()), base),                                                # fewer registers
        (replace(base, words=(I.NOP, base.words[1])), base),                           # a nop is simplest
        (replace(base, words=(base.words[0], I.add_imm(0, 0, 0))), base),              # a smaller word
        (replace(base, events=(Event("mmio-exit", 1, "signal"),)),
         replace(base, events=(Event("mmio-exit", 2, "immediate-exit"),))),           # an earlier event
        (replace(base, regs=(("x2", 0x1000),)), base),                                 # a smaller value
        (replace(base, memory=(replace(base.memory[0], prefault=True), base.memory[1])),
         replace(base, memory=(replace(base.memory[0], prefault=False), base.memory[1]))),
        (base, replace(base, mmio_read=5)),
        (base, replace(base, max_steps=100)),                                          # the default is simplest
    ]
    for a, b in simpler:
        assert sort_key(a) < sort_key(b)
    cases = [c for pair in simpler for c in pair]
    for a in cases:                         # total: equal keys only for equal cases
        for b in cases:
            assert (sort_key(a) == sort_key(b)) == (M.canonical(a) == M.canonical(b))


def test_every_accepted_candidate_is_strictly_smaller():
    case = padded_6_1_case()
    accepted = []
    small, stats = minimize(case, ERAS["6.1"], on_shrink=accepted.append)
    assert accepted and accepted[-1] == small and len(accepted) == stats.shrinks
    keys = [sort_key(replace(case, asm=None))] + [sort_key(c) for c in accepted]
    assert all(a > b for a, b in zip(keys, keys[1:]))
    assert not stats.bounded and stats.signature == signature(case)
    assert len(small.words) <= 4 and len(small.events) == 1
    assert minimize(case, ERAS["6.1"])[0] == small            # deterministic


# ---------------------------------------------------------------- the cache

def test_no_candidate_is_checked_twice_and_a_minimal_case_is_cheap():
    count = Counting()
    small, first = minimize(padded_6_1_case(), ERAS["6.1"], predicate=count)
    assert len(count.seen) == len(set(count.seen)) == first.checks - 1       # the original is checked apart
    assert first.cache_hits > 0 and first.rounds >= 2
    assert sum(p.calls for p in first.passes.values()) == first.checks - 1
    count.seen.clear()
    again, second = minimize(small, ERAS["6.1"], predicate=count)
    assert again == replace(small, asm=None) and second.shrinks == 0 and second.rounds == 1
    assert len(count.seen) == len(set(count.seen))
    assert second.checks <= 12                     # one round, every candidate once (measured: 7)


@pytest.mark.parametrize("path", KNOWN, ids=lambda p: p.stem)
def test_known_cases_keep_their_divergence_on_every_era(path):
    case = load_case(path)
    eras = [era for era, what in case.expect if what != "agree"]
    assert eras
    for era in eras:
        (r,) = check(case, [ERAS[era]])
        if r.divergence is None:            # the expectation is test_case_format's business, not minimize's
            continue
        small, stats = minimize(case, ERAS[era])
        (s,) = check(small, [ERAS[era]])
        assert s.divergence.signature == r.divergence.signature == stats.signature
        assert visible(s) or not visible(r)
        assert M.size(small) <= M.size(case) and len(small.words) <= 3
        assert stats.checks <= 40 and not stats.bounded and stats.errors == 0


# ---------------------------------------------------------------- each pass, and what it may spend

def test_drop_trailing_nops_is_one_check():
    small, p, _ = one_pass(case_6_1(CORE + "nop\n" * 20), "drop trailing nops")
    assert len(small.words) == 2 and p.calls == 1 and p.shrinks == 1


def test_delete_instructions_drops_60_padding_nops_in_few_checks():
    case = case_6_1("nop\n" * 30 + CORE + "nop\n" * 30)
    assert len(case.words) == 62 and signature(case) == SIG_6_1
    small, p, _ = one_pass(case, "delete instructions")
    assert len(small.words) == 2 and small.words[0] == case.words[30]       # the load, then any instruction
    assert p.calls <= 24                           # measured: 21 (delete one at a time: 60)
    small, stats = minimize(case, ERAS["6.1"])
    assert len(small.words) == 2 and stats.checks <= 30     # measured: 22


def test_delete_instructions_moves_instruction_timed_events():
    # 5.11: a host irq after an instruction retires; the event names the instruction
    case = parse_case(make("nop\n" * 12 + "add x0, x0, #1\nadd x0, x0, #1\n",
                           events=[{"when": "after", "insn": 13, "what": "host-irq"}]))
    assert signature(case, "5.11") == "5.11/multi-step/irq-pending"
    small, p, _ = one_pass(case, "delete instructions", "5.11")
    assert len(small.words) == 2 and small.events[0].at <= 2 and p.calls <= 12


def test_delete_instruction_blocks_finds_what_only_goes_together():
    # either eor alone points x2 at ram (no MMIO exit, no divergence); both together cancel out
    regs = {"x2": "0x20000000", "x3": hex(0x20000000 ^ 0x10000)}
    case = case_6_1("eor x2, x2, x3\neor x2, x2, x3\n" + CORE, regs=regs)
    assert signature(case_6_1("eor x2, x2, x3\n" + CORE, regs=regs)) is None
    small, p, _ = one_pass(case, "delete instructions")
    assert len(small.words) == 4 and p.shrinks == 0 and p.calls <= 4
    small, p, _ = one_pass(case, "delete instruction blocks")
    assert small.words == case.words[2:] and p.calls == 1


def incidental_events_case():
    """The 6.1 bug's one event among 10 that never fire (exit counts the run never reaches)."""
    events = ([{"when": "stop", "n": 50 + i, "what": "preempt"} for i in range(5)] + [IMMEDIATE_EXIT]
              + [{"when": "mmio-exit", "n": 40 + i, "what": "signal"} for i in range(5)])
    return case_6_1(events=events)


def test_drop_events_loses_10_incidental_events_in_few_checks():
    case = incidental_events_case()
    assert len(case.events) == 11 and signature(case) == SIG_6_1
    small, p, _ = one_pass(case, "drop events")
    assert small.events == (Event("mmio-exit", 1, "immediate-exit"),)
    assert p.calls <= 14                           # measured: 11 (one at a time, restarting: 10 + 1 + ...)
    small, p, _ = one_pass(case, "drop event blocks")
    assert len(small.events) < len(case.events) and p.calls <= 8


def test_replace_instructions_by_nop_takes_runs():
    case = case_6_1("add x5, x5, #1\n" * 10 + CORE)
    small, p, _ = one_pass(case, "replace instructions by nop")
    assert small.words[:10] == (I.NOP,) * 10 and p.calls <= 10      # measured: 8


def test_drop_memory_regions_keeps_the_code():
    extra = {"base": "0x50000", "size": "0x1000", "kind": "ram"}
    case = case_6_1(memory=(CODE, DATA, MMIO, KERNEL_MMIO, extra))
    small, p, _ = one_pass(case, "drop memory regions")
    assert len(small.memory) == 1 and case.base in small.memory[0] and p.calls <= 5


def test_drop_registers():
    regs = {f"x{i}": hex(0x1234 * i) for i in range(3, 14)} | X2
    case = case_6_1(regs=regs)
    small, p, _ = one_pass(case, "drop registers")
    # x2 = 0: an unmapped address is an MMIO exit as well
    assert small.regs == () and p.calls <= 8       # measured: 5


def test_simplify_instructions_clears_immediates_of_the_same_class():
    case = case_6_1("ldr x1, [x2, #16]\nadd x0, x0, #5\n")
    small, p, _ = one_pass(case, "simplify instructions")
    assert small.words == (I.ldst_uimm(3, 1, 1, 2, 0), I.add_imm(0, 0, 0)) and p.calls == 2
    assert simpler_word(I.NOP) is None and simpler_word(I.b(3)) is None      # branches keep their targets
    assert simpler_word(I.hvc(5)) == I.hvc(0)


def test_lower_register_values_by_bisection():
    # 5.13: a signal on the trap of a store to an in-kernel device; the address goes to the device's base
    case = parse_case(make("str w14, [x22]\nnop\n", regs={"x22": "0x800a3f0"}, memory=(CODE, KERNEL_MMIO),
                           events=[{"when": "trap", "insn": 1, "what": "signal"}]))
    small, p, _ = one_pass(case, "lower register values", "5.13")
    assert small.regs == (("x22", 0x8000000),) and p.calls <= 8              # measured: 4


def test_lower_event_times():
    case = case_6_1("ldr x1, [x2]\n" * 8 + "add x0, x0, #1\n",
                    events=[{"when": "mmio-exit", "n": 8, "what": "immediate-exit"}])
    small, p, _ = one_pass(case, "lower event times")
    assert small.events == (Event("mmio-exit", 1, "immediate-exit"),) and p.calls == 1
    # a signal on a trap: only the trapping instruction (the 6th) will do
    case = parse_case(make("nop\n" * 5 + "mrs x3, dbgwvr1_el1\nadd x0, x0, #1\n",
                           events=[{"when": "trap", "insn": 6, "what": "signal"}]))
    small, p, _ = one_pass(case, "lower event times", "5.13")
    assert small.events == case.events and p.calls <= 5         # 1, 2, 4 (low bits), 3 (shift), 5


def test_lower_and_find_integer_bisect():
    tried = []

    def attempt(v):
        tried.append(v)
        return v >= 637
    lower(1000, attempt)
    # the shrinker answers a repeated value from its cache, the current one without asking
    assert min(v for v in tried if v >= 637) == 637 and len(set(tried) - {1000}) <= 22      # measured: 21
    ok = [v for v in tried if v >= 637]
    assert ok == sorted(ok, reverse=True)          # every attempt lower than the last that worked
    tried.clear()                                  # an address past the 40-bit IPA space: any will do
    lower(0xF04B6A711FFABD43, lambda v: tried.append(v) or v >= 1 << 40)
    assert min(v for v in tried if v >= 1 << 40) == 1 << 40 and len(set(tried)) <= 30        # measured: 22
    calls = []
    assert find_integer(lambda k: calls.append(k) or k <= 37, 1000) == 37 and len(calls) <= 14
    assert find_integer(lambda k: k <= 5, 5) == 5 and find_integer(lambda k: False, 9) == 0


def test_prefault_ram():
    code = {k: v for k, v in CODE.items() if k != "prefault"}
    small, p, _ = one_pass(case_6_1(memory=(code, MMIO)), "prefault ram")
    assert small.memory[0].prefault and p.calls == 1


def test_simplify_values():
    small, p, _ = one_pass(case_6_1(max_steps=100, mmio_read="0x1234"), "simplify values")
    assert (small.max_steps, small.mmio_read) == (1000, 0) and p.calls == 2


def test_unknown_pass():
    with pytest.raises(ValueError, match="unknown pass"):
        minimize(case_6_1(), ERAS["6.1"], passes=("drop everything",))


# ---------------------------------------------------------------- bounds

def test_bounds_stop_it_and_say_so():
    case = padded_6_1_case()
    small, stats = minimize(case, ERAS["6.1"], max_shrinks=1)
    assert stats.shrinks == 1 and stats.bounded and "max_shrinks=1" in stats.stopped
    assert sort_key(small) < sort_key(replace(case, asm=None))
    assert "the result may not be minimal" in stats.table()
    small, stats = minimize(case, ERAS["6.1"], max_checks=5)
    assert stats.checks == 5 and stats.bounded and "max_checks=5" in stats.stopped
    small, stats = minimize(case, ERAS["6.1"], max_seconds=0)
    assert small == replace(case, asm=None) and stats.checks == 1 and "max_seconds" in stats.stopped
    small, stats = minimize(case, ERAS["6.1"])
    assert not stats.bounded and "minimal" in stats.table()


# ---------------------------------------------------------------- oracle errors

def test_an_oracle_error_is_counted_and_kept_not_raised(monkeypatch):
    real = M.check

    def flaky(case, eras, **kw):
        if len(case.words) == 3:
            raise RuntimeError("the oracle broke")
        return real(case, eras, **kw)
    monkeypatch.setattr(M, "check", flaky)
    small, stats = minimize(padded_6_1_case(), ERAS["6.1"])
    assert stats.errors > 0 and stats.errors == sum(p.errors for p in stats.passes.values())
    first = stats.first_errors[0]
    assert first.error == "RuntimeError: the oracle broke" and len(json.loads(first.case)["code"]["words"]) == 3
    assert first.pass_name in stats.passes and "oracle error in" in stats.table()
    assert signature(small) == stats.signature and len(small.words) != 3


def test_only_the_first_oracle_errors_are_kept(monkeypatch):
    real, original = M.check, padded_6_1_case()

    def broken(case, eras, **kw):
        if case != original:
            raise ValueError("no")
        return real(case, eras, **kw)
    monkeypatch.setattr(M, "check", broken)
    small, stats = minimize(original, ERAS["6.1"])
    assert small == replace(original, asm=None)                   # nothing was interesting
    assert stats.errors == stats.checks - 1 > M.KEPT_ERRORS == len(stats.first_errors)


def test_a_predicate_that_raises_is_an_error_too():
    def bad(original):
        def interesting(r):
            raise KeyError("signature")
        return interesting
    small, stats = minimize(case_6_1(), ERAS["6.1"], predicate=bad)
    assert stats.errors == stats.checks - 1 > 0 and stats.first_errors[0].error.startswith("KeyError")


def test_not_divergent():
    with pytest.raises(NotDivergent, match="does not diverge on era 6.1"):
        minimize(load_case(CORPUS / "programs" / "loop.json"), ERAS["6.1"])


def test_verbose_minimize_prints_the_statistics(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(padded_6_1_case().dumps())
    p = stepfuzz("minimize", path, "--era", "6.1", "-v", "-o", tmp_path / "small.json")
    assert p.returncode == 0, p.stderr
    assert "calls" in p.stdout and "shrinks" in p.stdout and "delete instructions" in p.stdout
    assert "no pass makes progress" in p.stdout


# ---------------------------------------------------------------- the root cause, campaigns' predicate

def test_a_finding_keeps_its_root_cause_and_loses_incidental_events():
    """Two preempts and a signal beside the 6.1 bug change its per-era
    signature but not its mechanism: minimized for the root cause they go."""
    noisy = case_6_1(events=(IMMEDIATE_EXIT, {"when": "stop", "n": 1, "what": "preempt"},
                             {"when": "mmio-exit", "n": 1, "what": "preempt"}))
    (r,) = check(noisy, [ERAS["6.1"]])
    assert "preempt" in r.divergence.signature
    kept, _ = minimize(noisy, ERAS["6.1"])                                   # per-era signature
    assert any(e.what == "preempt" for e in kept.events)
    small, stats = M.minimize(noisy, ERAS["6.1"])                            # root cause (the default)
    assert [e.what for e in small.events] == ["immediate-exit"]
    assert stats.signature == M.root_of(r) == "v6.14:2ca3f03bf524/multi-step"
    (s,) = check(small, [ERAS["6.1"]])
    assert M.root_of(s) == stats.signature


@pytest.mark.parametrize("path", KNOWN, ids=lambda p: p.stem)
def test_known_cases_keep_their_root_cause(path):
    case = load_case(path)
    era = ERAS[path.stem.split("-")[0] if path.stem[0].isdigit() else "rfc-2018"]
    (r,) = check(case, [era])
    small, stats = M.minimize(case, era)
    (s,) = check(small, [era])
    assert M.root_of(s) == M.root_of(r) == stats.signature and len(small.words) <= 3

