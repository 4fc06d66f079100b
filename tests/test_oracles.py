"""The reference against QEMU's own software step, and the era models against the corpus."""
import json
import random

import pytest

from conftest import CODE, CORPUS, make
from stepfuzz.fuzz.inputs import generate as G
from stepfuzz.fuzz.inputs import insns as I
from stepfuzz.oracle.case import Case, Region, Vectors
from stepfuzz.oracle.isa import InsnClass, decode
from stepfuzz.oracle.vocabulary import Meets, Outcome
from stepfuzz.oracle.archstep import arch_step_pcs
from stepfuzz.oracle.case import load_case, parse_case
from stepfuzz.oracle.guest import execute
from stepfuzz.oracle.kvm.eras import ERAS, select
from stepfuzz.oracle.reference import reference
from stepfuzz.oracle.run import check

CORPUS_FILES = sorted(CORPUS.rglob("*.json"))
DATA_PF = {"base": "0x40000", "size": "0x4000", "kind": "ram", "prefault": True}


def exit_free_program(rnd: random.Random) -> dict:
    """Random straight-line code, forward branches and bounded loops over RAM."""
    lines, n = [], rnd.randint(4, 40)
    for i in range(n):
        lines.append(f"l{i}:")
        r = rnd.random()
        a, b, c = (rnd.randrange(8) for _ in range(3))
        if r < 0.35:
            op = rnd.choice(["add", "sub", "eor", "orr", "and"])
            lines.append(f"{op} x{a}, x{b}, x{c}")
        elif r < 0.5:
            lines.append(f"movz x{a}, #{rnd.randrange(1 << 16)}, lsl #{rnd.choice([0, 16, 32, 48])}")
        elif r < 0.65:
            off = rnd.randrange(0, 0x3ff8, 8)
            lines.append(f"{rnd.choice(['ldr', 'str'])} x{a}, [x9, #{off}]")
        elif r < 0.8 and i + 2 < n:
            target = rnd.randrange(i + 1, n)
            lines.append(rnd.choice([f"b l{target}", f"cbz x{a}, l{target}", f"cbnz x{a}, l{target}", f"tbz x{a}, #{rnd.randrange(64)}, l{target}"]))
        elif r < 0.9 and i > 0:
            # a loop back to an earlier label, bounded by a counter in x10
            lines.append(f"sub x10, x10, #1\ncbnz x10, l{rnd.randrange(i)}")
        else:
            lines.append(rnd.choice(["nop", "ror x3, x4, #7", "madd x5, x6, x7, x1", "csel x1, x2, x3, ne", "adds x4, x4, #1"]))
    return make("\n".join(lines), {"x9": "0x40000", "x10": str(rnd.randint(1, 6))}, (CODE, DATA_PF),
                max_steps=300)


@pytest.mark.parametrize("seed", range(60))
def test_reference_matches_qemu_architectural_step(seed):
    case = parse_case(exit_free_program(random.Random(seed)))
    assert reference(execute(case)).pcs == arch_step_pcs(case)


@pytest.mark.parametrize("path", [p for p in CORPUS_FILES if "programs" in p.parts], ids=lambda p: p.stem)
def test_reference_matches_qemu_on_corpus_programs(path):
    case = load_case(path)
    assert reference(execute(case)).pcs == arch_step_pcs(case)


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: str(p.relative_to(CORPUS)))
def test_corpus_case_behaves_as_expected_in_every_era(path):
    case = load_case(path)
    expect = dict(case.expect)
    assert set(expect) == set(ERAS), "every seed case states what each era shows"
    got = {r.era.id: (r.divergence.kind if r.divergence else r.model.outcome
                      if r.model.outcome == Outcome.NOT_REPRODUCIBLE else "agree") for r in check(case, select("all"))}
    assert got == expect


def test_arch_never_disagrees_with_the_reference_on_the_corpus():
    for path in CORPUS_FILES:
        (r,) = check(load_case(path), select("arch"))
        assert r.divergence is None, path


def test_each_known_divergence_reproduces_and_is_fixed_later():
    known = {p.stem: dict(load_case(p).expect) for p in (CORPUS / "known").glob("*.json")}
    # kvm-single-step.md section 3: the divergence each known case stands for
    assert known["4.15-stage2-fault-zero-step"]["4.15"] == "zero-step"
    assert known["4.14-emulated-sysreg-multi-step"]["4.14"] == "multi-step"
    assert known["4.14-userspace-mmio-multi-step"]["4.14"] == "multi-step"
    assert known["5.0-immediate-exit-skips-insn"]["5.0"] == "skipped-instruction"
    assert known["5.11-irq-after-retire-multi-step"]["5.11"] == "multi-step"
    assert known["6.1-immediate-exit-after-mmio"]["6.1"] == "multi-step"
    # found on real kernels: 5.10.223, 6.1.192, 6.12.118 zero-extend, 7.3.4 sign-extends
    assert known["mmio-load-loses-its-sign"]["6.14"] == "state-mismatch"
    for name, expect in known.items():
        assert expect["7.2"] == expect["arch"] == "agree", name


def test_model_agrees_with_real_kernel_measurements():
    """kvm-single-step.md section 4: steps per stop measured on Debian kernels."""
    def steps_at(case_file, era, index):
        (r,) = check(load_case(CORPUS / "real-kernel" / case_file), select(era))
        return r.model.stops[index].steps
    # stop indices: 2 = after the MMIO load, then sysreg and hvc windows
    for era, mmio, ie in (("5.10", 2, 2), ("6.1", 1, 2), ("6.14", 1, 1)):
        assert steps_at("probe.json", era, 2) == mmio
        assert steps_at("probe-immediate-exit.json", era, 2) == ie


def test_divergence_signature_is_stable_and_free_of_addresses():
    case = load_case(CORPUS / "known" / "6.1-immediate-exit-after-mmio.json")
    sigs = {check(case, select("6.1"))[0].divergence.signature for _ in range(3)}
    assert sigs == {"6.1/multi-step/immediate-exit+mmio"}
    moved = json.loads((CORPUS / "known" / "6.1-immediate-exit-after-mmio.json").read_text())
    moved["code"]["base"] = "0x10800"
    moved["regs"]["x2"] = "0x20000100"
    moved["code"]["asm"] = "add x5, x5, #1\n" + moved["code"]["asm"]
    (r,) = check(parse_case(moved), select("6.1"))
    assert r.divergence.signature == "6.1/multi-step/immediate-exit+mmio"


def test_same_case_gives_the_same_trace_every_time():
    case = load_case(CORPUS / "real-kernel" / "probe-immediate-exit.json")
    runs = [[(r.model.stops, r.model.outcome) for r in check(case, select("all"))] for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]


def test_fast_forward_changes_no_trace(monkeypatch):
    """Runs of plain instructions applied in bulk from learned steady states
    must give exactly the traces of the full loop, on generated and mutated
    cases, with the learned states empty and full."""
    from stepfuzz.fuzz.inputs.generate import generate
    import stepfuzz.fuzz.inputs.mutate as mutate
    import stepfuzz.oracle.kvm.vmm as vmm
    monkeypatch.setattr(mutate, "BYTE_LEVEL_SHARE", 0.0)
    rnd = random.Random(11)
    cases = [generate(rnd) for _ in range(300)] + [load_case(p) for p in CORPUS_FILES]
    cases += [mutate.mutate_case(rnd, rnd.choice(cases)) for _ in range(300)]
    eras = select("all")

    def traces():
        return [[(r.model.stops, r.model.outcome, r.model.detail, r.model.skipped, r.model.tail)
                 for r in check(c, eras)] for c in cases]
    vmm._STEADY.clear()
    cold = traces()                    # learning
    warm = traces()                    # learned
    monkeypatch.setattr(vmm, "FAST_FORWARD", False)
    assert traces() == cold == warm


def test_stopping_at_the_first_divergence_gives_the_same_divergence(monkeypatch):
    """Campaigns stop each model at its first differing stop; the divergence
    (kind, stop, signature, both stops) must be the one the full trace gives."""
    from stepfuzz.fuzz.inputs.generate import generate
    import stepfuzz.fuzz.inputs.mutate as mutate
    monkeypatch.setattr(mutate, "BYTE_LEVEL_SHARE", 0.0)
    rnd = random.Random(9)
    cases = [generate(rnd) for _ in range(200)] + [load_case(p) for p in CORPUS_FILES]
    cases += [mutate.mutate_case(rnd, rnd.choice(cases)) for _ in range(200)]
    eras = select("all")
    for c in cases:
        full = [r.divergence.to_json() if r.divergence else None for r in check(c, eras)]
        early = [r.divergence.to_json() if r.divergence else None for r in check(c, eras, True)]
        assert early == full


def test_a_signal_during_an_exit_kvm_handles_is_an_eintr_the_reference_sees_too():
    """The VMM counts every -EINTR, the reference's too: a register write at
    the first eintr lands where it lands in the models (found by the quick
    start's campaign: every era, arch included, showed a state mismatch)."""
    case = parse_case(make("nop\nmrs x3, dbgbcr0_el1\nadd x9, x9, #1\nnop", {}, (CODE,), events=[
        {"when": "trap", "insn": 2, "what": "signal"},
        {"when": "eintr", "n": 1, "what": "set-reg", "reg": "x9", "value": "0x10"}]))
    ref = reference(execute(case))
    assert [e.kind for s in ref.stops for e in s.exits] == ["eintr"]
    (r,) = check(case, select("arch"))
    assert r.divergence is None and r.reference.final_regs["x9"] == 0x11


def test_a_guest_running_free_past_its_bound_ends_alike_in_the_reference_and_the_models():
    """With nothing stepping, the bound on a free-running guest is checked
    before a breakpoint at the next instruction, in the reference as in the
    models (the quick start's campaign found them ordering it differently)."""
    case = parse_case(make("nop\nnop\nnop", {}, (CODE,), events=[{"when": "start", "what": "debug", "control": "continue"}],
                           max_steps=1))
    for r in check(case, select("all")):
        assert r.divergence is None, r.era.id
        assert (r.reference.outcome, r.model.outcome) == (Outcome.MAX_STEPS, Outcome.MAX_STEPS)


def exception_program(rnd: random.Random) -> Case:
    """Exit-free code that takes SVCs, UNDEFs and FP traps to handlers that
    return past them, and ERETs with varied DAIF."""
    words: list[int] = []
    while len(words) < rnd.randint(6, 30):
        r = rnd.random()
        if r < 0.25:
            # (not FP: Unicorn reports its trap with the PC past it, as it reports a step)
            words += [I.udf(1) if w == I.FMOV_D0_X1 else w for w in G.exception_snippet(rnd)]
        elif r < 0.35:
            skip = G.alu(rnd)
            words += [I.b(len(skip) + 1)] + skip
        else:
            words += G.alu(rnd)
    handlers = (("sync", G.handler(rnd, "sync")[-8:], None),)     # (its exit-free tail: skip, ERET)
    return Case(base=0x10000, words=tuple(words), memory=(Region(0x10000, 0x10000, "ram", True),),
                vectors=Vectors(G.VBAR, handlers), el1_regs=(("daif", rnd.choice((0x3C0, 0x300))),),
                max_steps=300)


@pytest.mark.parametrize("seed", range(40))
def test_reference_matches_qemu_architectural_step_through_exceptions(seed):
    case = exception_program(random.Random(seed))
    log = execute(case)
    assert log.outcome in (Outcome.END, Outcome.MAX_STEPS), log.detail
    assert any(s.kind in (Meets.SVC, Meets.EXCEPTION) for s in log.specials.values()) or not any(
        decode(w).kind == InsnClass.GUEST_EXCEPTION for w in case.words)
    assert reference(log).pcs == arch_step_pcs(case)
