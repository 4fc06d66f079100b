"""`stepfuzz run`, `case check` and `eras` as a user runs them."""
import json

from conftest import CODE, CORPUS, MMIO, make, stepfuzz
from stepfuzz.oracle.kvm.eras import ERAS


def test_json_lines_follow_the_contract():
    p = stepfuzz("run", CORPUS / "known" / "6.1-immediate-exit-after-mmio.json", "--era", "6.1,6.14", "--json")
    assert p.returncode == 1, p.stderr
    lines = [json.loads(l) for l in p.stdout.splitlines()]
    assert [l["era"] for l in lines] == ["6.1", "6.14"]
    first = lines[0]
    assert first["case"].endswith("6.1-immediate-exit-after-mmio.json")
    assert first["reference"][0] == {"pc": 0x10004, "steps": 1}
    assert {"pc", "steps", "isv"} <= set(first["model"][0])
    assert first["divergence"]["kind"] == "multi-step" and first["divergence"]["stop"] == 1
    assert first["divergence"]["signature"] == "6.1/multi-step/immediate-exit+mmio"
    assert lines[1]["divergence"] is None


def test_table_shows_both_sides_and_the_divergence():
    p = stepfuzz("run", CORPUS / "known" / "4.15-stage2-fault-zero-step.json", "--era", "4.15")
    assert p.returncode == 1
    assert "ldr x1, [x9]" in p.stdout and "<< zero-step" in p.stdout
    assert "expected: zero-step -> as expected" in p.stdout


def test_agreement_exits_zero(write_case):
    p = stepfuzz("run", write_case(make("nop\nadd x0, x0, #1")), "--era", "all")
    assert p.returncode == 0 and f"{len(ERAS)} agree, 0 diverge" in p.stdout


def test_bad_input_is_one_line_and_exit_2(write_case, tmp_path):
    bad = write_case('{"stepfuzz": 1, "code": {"base": 65536, "asm": "nop"}, "memory": [], "colour": 1}', "bad.json")
    good = write_case(make("nop"), "good.json")
    p = stepfuzz("run", bad, good, "--era", "6.1")
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "bad.json: colour: unknown field" in p.stderr
    assert "good.json  era 6.1" in p.stdout          # the good case still ran
    p = stepfuzz("run", good, "--era", "9.9")
    assert p.returncode == 2 and "unknown era '9.9'" in p.stderr and "Traceback" not in p.stderr
    p = stepfuzz("run", tmp_path / "missing.json")
    assert p.returncode == 2 and "missing.json: no such file" in p.stderr
    p = stepfuzz("case", "check", bad, good)
    assert p.returncode == 2 and "ok  " in p.stdout


def test_guest_that_never_ends_and_unsupported_code_are_clean_results(write_case):
    loop = write_case(make("self:\nb self", max_steps=50), "loop.json")
    wfi = write_case(make("nop\nwfi"), "wfi.json")
    nisv = write_case(make("ldp x1, x2, [x3]", {"x3": "0x20000000"}, (CODE, MMIO)), "nisv.json")
    p = stepfuzz("run", loop, wfi, nisv, "--era", "all", "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    ends = {(json.loads(l)["case"].split("/")[-1], json.loads(l)["model_end"]) for l in p.stdout.splitlines()}
    assert ends == {("loop.json", "max-steps"), ("wfi.json", "unsupported"), ("nisv.json", "no-syndrome")}


def test_directories_and_eras_listing():
    p = stepfuzz("case", "check", CORPUS)
    assert p.returncode == 0 and p.stdout.count("ok  ") == len(list(CORPUS.rglob("*.json")))
    p = stepfuzz("eras")
    assert p.returncode == 0
    for era in ("4.14", "4.15", "rfc-2018", "5.0", "5.10", "5.11", "5.13", "6.1", "6.14", "7.2", "arch"):
        assert f"\n{era} " in "\n" + p.stdout


def test_the_shipped_crash_example_replays_to_its_signature():
    examples = sorted((CORPUS.parent / "crashes" / "examples").glob("*/divergence.json"))
    assert examples
    for info_path in examples:
        info = json.loads(info_path.read_text())
        for case in ("case.json", "minimized.json"):
            p = stepfuzz("run", info_path.parent / case, "--era", info["era"], "--json")
            assert p.returncode == 1, p.stderr
            assert json.loads(p.stdout)["divergence"]["signature"] == info["signature"]
