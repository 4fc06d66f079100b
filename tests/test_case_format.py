"""Case files: round trip and one clear error per kind of bad input."""

import pytest

from conftest import CODE, DATA, MMIO, make
from stepfuzz.oracle.case import CaseError, load_case, loads_case, parse_case


def test_asm_and_words_give_the_same_case():
    a = parse_case(make("nop\nadd x0, x0, #1"))
    b = parse_case({"stepfuzz": 1, "code": {"base": 0x10000, "words": ["0xd503201f", "0x91000400"]},
                    "memory": [CODE]})
    assert a.words == b.words == (0xD503201F, 0x91000400)


def test_round_trip_keeps_everything():
    data = make("ldr x1, [x2]", {"x2": "0x20000000", "sp": "0x44000"}, (CODE, DATA, MMIO),
                [{"when": "mmio-exit", "n": 1, "what": "immediate-exit"}], mmio_read="0x1234", max_steps=77,
                name="n", expect={"6.1": "multi-step"})
    case = parse_case(data)
    again = loads_case(case.dumps())
    assert again == case
    assert parse_case(case.with_words().to_json()).words == case.words


@pytest.mark.parametrize("mutate, where, words", [
    (lambda c: c.pop("stepfuzz"), "stepfuzz", "missing"),
    (lambda c: c.update(stepfuzz=2), "stepfuzz", "unsupported format version"),
    (lambda c: c.update(colour="red"), "colour", "unknown field"),
    (lambda c: c["code"].update(words=["0x1"]), "code", "exactly one of"),
    (lambda c: c["code"].update(base="0x10002"), "code.base", "not 4-byte aligned"),
    (lambda c: c["code"].update(asm="nop\nfrobnicate x0"), "code.asm", "frobnicate"),
    (lambda c: c["code"].update(asm="1: b 1b"), "code.asm", "numeric labels"),
    (lambda c: c["code"].update(asm="add x0, x0, #1 \u00e9"), "code.asm", "not ASCII"),
    (lambda c: c["code"].update(base="0x90000"), "code.base", "not inside a ram region"),
    (lambda c: c["memory"].append({"base": "0x18000", "size": "0x1000", "kind": "mmio"}), "memory[1]", "overlaps memory[0]"),
    (lambda c: c["memory"].append({"base": "0x30000", "size": "0x1000", "kind": "rom"}), "memory[1].kind", "unknown kind"),
    (lambda c: c["memory"].append({"base": "0x30800", "size": "0x1000", "kind": "ram"}), "memory[1]", "multiples of 4 KiB"),
    (lambda c: c["memory"].append({"base": "0x30000", "size": "0x1000", "kind": "mmio", "prefault": True}), "memory[1].prefault", "only ram"),
    (lambda c: c["memory"].append({"base": "0xffffff0000", "size": "0x100000", "kind": "ram"}), "memory[1]", "beyond the 40-bit"),
    (lambda c: c.update(regs={"x31": 1}), "regs.x31", "unknown field"),
    (lambda c: c.update(regs={"x1": "zz"}), "regs.x1", "not a number"),
    (lambda c: c.update(regs={"x1": -1}), "regs.x1", "outside"),
    (lambda c: c.update(mmio_read=True), "mmio_read", "expected a number"),
    (lambda c: c.update(events=[{"when": "later", "n": 1, "what": "signal"}]), "events[0].when", "unknown trigger"),
    (lambda c: c.update(events=[{"when": "stop", "what": "signal"}]), "events[0].n", "missing"),
    (lambda c: c.update(events=[{"when": "stop", "n": 0, "what": "signal"}]), "events[0].n", "counts from 1"),
    (lambda c: c.update(events=[{"when": "before", "insn": 1, "what": "signal"}]), "events[0].what", "cannot happen"),
    (lambda c: c.update(events=[{"when": "before", "n": 1, "what": "host-irq"}]), "events[0].n", "unknown field"),
    (lambda c: c.update(max_steps=0), "max_steps", "outside 1.."),
    (lambda c: c.update(expect={"9.9": "agree"}), "expect.9.9", "unknown field"),
    (lambda c: c.update(expect={"6.1": "broken"}), "expect.6.1", "unknown expectation"),
])
def test_bad_cases_name_file_and_field(mutate, where, words):
    data = make("nop")
    mutate(data)
    with pytest.raises(CaseError) as e:
        parse_case(data, "f.json")
    msg = str(e.value)
    assert msg.startswith(f"f.json: {where}:"), msg
    assert words in msg and "\n" not in msg


def test_code_running_past_its_region():
    data = make("nop", memory=[{"base": "0x10000", "size": "0x1000", "kind": "ram"}])
    data["code"]["base"] = "0x10ffc"
    with pytest.raises(CaseError, match="past the end of its ram region"):
        parse_case(data)


def test_malformed_json_and_missing_file(write_case, tmp_path):
    p = write_case('{"stepfuzz": 1, "code": ')
    with pytest.raises(CaseError, match=r"case.json: not valid JSON: .* line 1"):
        load_case(p)
    with pytest.raises(CaseError, match="no such file"):
        load_case(tmp_path / "absent.json")
    p = tmp_path / "binary.json"
    p.write_bytes(b"\xff\xfe")              # not UTF-8 at all
    with pytest.raises(CaseError, match="binary.json: not UTF-8 text"):
        load_case(p)


def test_shipped_corpus_is_valid():
    from conftest import CORPUS
    files = sorted(CORPUS.rglob("*.json"))
    assert len(files) >= 25
    for f in files:
        case = load_case(f)
        assert case.name and case.expect, f


def test_the_contracts_extension_example_loads():
    """../shared/docs/case-format.md, "Extensions": the example as written
    there loads under its names (its program `...` stands for any code, and
    the memory it leaves out is the base format's)."""
    example = {
        "stepfuzz": 1,
        "code": {"base": "0x10000", "asm": "nop\nnop"},
        "regs": {"x2": "0x20000000", "daif": "0x2c0"},
        "memory": [{"base": "0x10000", "size": "0x10000", "kind": "ram"},
                   {"base": "0x20000000", "size": "0x1000", "kind": "mmio"}],
        "vectors": {"base": "0x18000", "sync": "mrs x9, elr_el1\nadd x9, x9, #4\nmsr elr_el1, x9\neret",
                    "irq": "str x0, [x2]\neret"},
        "smccc_forward": [["0xc2000000", 16]],
        "hypercall_result": "0x5",
        "nisv": "end",
        "events": [
            {"when": "start", "what": "irq-line", "line": "irq", "level": 1},
            {"when": "mmio-exit", "n": 1, "what": "irq-line", "line": "irq", "level": 0},
            {"when": "eintr", "n": 1, "what": "set-reg", "reg": "pc", "value": "0x10010"},
            {"when": "hypercall-exit", "n": 1, "what": "debug", "control": "continue", "hw-bp": ["0x10020"]},
            {"when": "stop", "n": 3, "what": "debug", "control": "step"},
            {"when": "system-event", "n": 1, "what": "vcpu-init"},
        ],
    }
    c = parse_case(example, "contract")
    assert c.vectors.base == 0x18000 and [k for k, _, _ in c.vectors.handlers] == ["sync", "irq"]
    assert dict(c.el1_regs) == {"daif": 0x2C0} and c.smccc_forward == ((0xC2000000, 16),)
    assert c.hypercall_result == 5 and c.nisv == "end"
    assert [(e.when, e.what) for e in c.events] == [
        ("start", "irq-line"), ("mmio-exit", "irq-line"), ("eintr", "set-reg"), ("hypercall-exit", "debug"),
        ("stop", "debug"), ("system-event", "vcpu-init")]
    assert c.events[3].hw_bp == (0x10020,) and c.events[0].line == "irq" and c.events[0].level == 1
