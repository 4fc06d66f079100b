"""Real kernels under QEMU: kernels, the runner, its protocol and `stepfuzz kvm`.

No mocks.  The whole shipped corpus goes through `stepfuzz kvm check` once
per kernel (one boot each, session-scoped).  Without a kernel or QEMU the
real-kernel tests skip, unless STEPFUZZ_REQUIRE_KVM is set (CI), where they
fail.
"""
import json
import os
import subprocess
import time

import pytest

from stepfuzz.oracle.run import not_reproducible
from conftest import CODE, CORPUS, MMIO, REPO, make, stepfuzz
from stepfuzz.oracle.case import INSN_EVENTS, load_case, parse_case
from stepfuzz.oracle.guest import execute
from stepfuzz.oracle.realkvm import kernels
from stepfuzz.oracle.realkvm.batch import Parser, RealTrace, difference, encode, infer_steps
from stepfuzz.oracle.trace import HSR_NOT_STEPPED, HSR_STEPPED, Exit, Stop, Trace

KERNELS = ("6.1", "latest")
CORPUS_FILES = sorted(str(p.relative_to(REPO)) for p in CORPUS.rglob("*.json"))
PROBE, PROBE_IE = "corpus/real-kernel/probe.json", "corpus/real-kernel/probe-immediate-exit.json"


@pytest.fixture(scope="session")
def extra_cases(tmp_path_factory):
    """Cases beyond the corpus that exercise the runner's refusals."""
    d = tmp_path_factory.mktemp("extra")
    gic = {"base": "0x8001000", "size": "0x1000", "kind": "mmio-kernel"}
    (d / "gic-misaligned.json").write_text(json.dumps(make("nop\nldr w1, [x2]", {"x2": "0x8001000"}, (CODE, gic))))
    (d / "wfi.json").write_text(json.dumps(make("nop\nwfi\nnop")))
    return d


@pytest.fixture(scope="session")
def checked(kernel, extra_cases):
    """kernel name -> {case path: the `kvm check --json` line}, one boot per kernel."""
    out = {}
    for name in KERNELS:
        kernel(name)
        p = stepfuzz("kvm", "check", "corpus", extra_cases, "--kernel", name, "--json")
        assert p.returncode in (0, 1), p.stderr + p.stdout[-2000:]
        lines = [json.loads(line) for line in p.stdout.splitlines()]
        out[name] = {line["case"]: line for line in lines}
        assert "cases identical stop for stop" in p.stderr
    return out


# ---------------------------------------------------------------- every corpus case, both kernels

@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("case", CORPUS_FILES)
def test_corpus_case_is_identical_on_the_real_kernel(checked, name, case):
    line = checked[name][case]
    c = load_case(REPO / case)
    outcome = execute(c).outcome
    if outcome in ("unsupported", "guest-exception"):
        assert line["status"] == f"not-comparable:{outcome}"
    elif not_reproducible(c, era_of_kernel(name)):           # a KVM feature the kernel lacks
        assert line["status"] == "not-reproducible:feature" and "v6.4" in line["detail"]
    elif any(e.when in INSN_EVENTS for e in c.events):      # host-irq / trap-signal: not under TCG
        assert line["status"].startswith("not-reproducible:")
        assert line["detail"].startswith("not reproducible here: ")
    elif _tcg_order_in_model(c, era_of_kernel(name)):
        # the model took a due step first where TCG takes the other (docs/eras.md)
        assert line["status"] in ("identical", "model-only"), json.dumps(line)[:3000]
        assert line["status"] == "identical" or line["difference"]["tcg_limit"]
    else:
        assert line["status"] == "identical", json.dumps(line)[:3000]


def _tcg_order_in_model(case, era) -> bool:
    from stepfuzz.oracle.run import check
    from stepfuzz.oracle.vocabulary import TCG_ORDERS
    (r,) = check(case, [era])
    return any(w in TCG_ORDERS for s in r.model.stops for w in s.why)


def era_of_kernel(name: str):
    from stepfuzz.oracle.kvm.eras import ERAS
    from stepfuzz.oracle.realkvm.kernels import era_of, target
    return ERAS[era_of(target(name))]


def test_the_new_predicted_divergences_show_on_the_kernels_they_are_predicted_for(checked):
    """The SMC-forward multi-step (6.4-6.13) and the zero-step after
    continue-then-stepi (6.4 and later) are kernel behaviour, not model
    artefacts: each real trace is the era model's, stop for stop, and the
    model diverges from the reference there."""
    from stepfuzz.oracle.kvm.eras import ERAS
    from stepfuzz.oracle.run import check
    for name in KERNELS:
        era = era_of_kernel(name)
        for path in ("corpus/conversation/hvc-forwarded-continue-then-step.json", "corpus/conversation/smc-forwarded.json"):
            c = load_case(REPO / path)
            line = checked[name][path]
            if not_reproducible(c, era):
                assert line["status"] == "not-reproducible:feature"
                continue
            assert line["status"] == "identical"
            (r,) = check(c, [ERAS[era.id]])
            assert (r.divergence.kind if r.divergence else "agree") == dict(c.expect)[era.id]


def test_runner_refusals_are_reported_not_compared(checked, extra_cases):
    for name in KERNELS:
        lines = checked[name]
        gic = lines[str(extra_cases / "gic-misaligned.json")]
        assert gic["status"] == "unsupported-by-runner" and "64 KiB" in gic["detail"]
        wfi = lines[str(extra_cases / "wfi.json")]
        assert wfi["status"] == "not-comparable:unsupported"


def test_a_preempt_migrates_to_the_second_cpu_brought_online_for_it(checked):
    """The guest boots with CPU 1 offline; a batch with a `preempt` brings it
    online, else the runner notes that it cannot move the vCPU thread."""
    preempts = [c for c in CORPUS_FILES if any(e.what == "preempt" for e in load_case(REPO / c).events)]
    assert len(preempts) >= 2
    for name in KERNELS:
        for c in preempts:
            line = checked[name][c]
            assert line["status"] == "identical", (name, c, line)
            assert not [n for n in line["real"].get("notes", []) if "preempt" in n], (name, c, line["real"]["notes"])


# ---------------------------------------------------------------- the measured table (kvm-single-step.md §4)

def _stop_at(trace: dict, pc: int) -> dict:
    return next(s for s in trace["stops"] if s["pc"] == pc)


def test_6_1_mmio_stop_has_isv0_and_immediate_exit_gives_two_instructions(checked):
    probe = checked["6.1"][PROBE]["real"]
    assert probe["end"] == "end" and len(probe["stops"]) == 10
    assert all(s["steps"] == 1 for s in probe["stops"])           # MMIO, sysreg, hvc: 1 each
    assert _stop_at(probe, 0x1000c)["isv"] == 0                    # right after the emulated ldr
    ie = checked["6.1"][PROBE_IE]["real"]
    third = ie["stops"][2]
    assert (third["pc"], third["steps"]) == (0x10010, 2)           # ldr + add in one stop
    assert [e["kind"] for e in ie["exits"] if e["after_stop"] == 2] == ["mmio", "eintr"]


def test_latest_immediate_exit_after_mmio_is_one_instruction(checked):
    probe = checked["latest"][PROBE]["real"]
    assert all(s["steps"] == 1 for s in probe["stops"]) and len(probe["stops"]) == 10
    assert _stop_at(probe, 0x1000c)["isv"] == 0
    ie = checked["latest"][PROBE_IE]["real"]
    third = ie["stops"][2]
    assert (third["pc"], third["steps"]) == (0x1000c, 1)
    assert all(s["steps"] == 1 for s in ie["stops"]) and len(ie["stops"]) == 10


# ---------------------------------------------------------------- failures never hang

def test_a_file_that_is_not_a_kernel_is_refused_before_booting(tools, tmp_path):
    """It used to boot and wait out the boot timeout, case by case."""
    bogus = tmp_path / "vmlinuz"
    bogus.write_bytes(b"not a kernel\n" * 4096)
    start = time.monotonic()
    p = stepfuzz("kvm", "run", PROBE, "corpus/exits/dbgreg.json", "--kernel", bogus, "--boot-timeout", "5",
                 "--json", timeout=120)
    assert time.monotonic() - start < 30
    assert p.returncode == 2 and p.stdout == "", p.stderr
    assert p.stderr.strip().count("\n") == 0 and "not a Linux kernel image (no 'Linux version' banner" in p.stderr


def test_missing_qemu_is_one_line_naming_the_package(kernel):
    kernel("6.1")
    p = stepfuzz("kvm", "run", PROBE, "--kernel", "6.1", env=dict(os.environ, PATH="/nonexistent"))
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "qemu-system-arm" in p.stderr


def test_uncached_kernel_names_the_fetch_command(tmp_path):
    p = stepfuzz("kvm", "check", PROBE, "--kernel", "6.12", "--cache", tmp_path)
    assert p.returncode == 2 and "stepfuzz kernels fetch 6.12" in p.stderr


def test_second_fetch_is_a_no_op(kernel):
    kernel("6.1")
    start = time.monotonic()
    p = stepfuzz("kernels", "fetch", "6.1")
    assert p.returncode == 0 and "cached" in p.stdout and time.monotonic() - start < 20
    p = stepfuzz("kernels", "list")
    assert p.returncode == 0 and "6.1" in p.stdout


def test_exec_relays_output_and_exit_status(kernel, tmp_path):
    kernel("latest")
    src = tmp_path / "hello.c"
    src.write_text('#include <stdio.h>\nint main(void) { printf("hello from /prog\\n"); return 7; }\n')
    prog = tmp_path / "hello"
    subprocess.run(["aarch64-linux-gnu-gcc", "-static", "-O2", "-o", str(prog), str(src)], check=True)
    p = stepfuzz("kvm", "exec", prog, "--kernel", "latest", timeout=300)
    assert p.returncode == 7, p.stderr
    assert "hello from /prog" in p.stdout


# ---------------------------------------------------------------- protocol and helpers (no VM)

def test_era_for_version():
    table = {"4.14.336": "4.14", "4.19.0": "4.15", "5.2.21": "5.0", "5.10.223": "5.10", "5.12.9": "5.11",
             "5.12.10": "5.13", "5.15.0-91-generic": "5.13", "6.1.192": "6.1", "6.3.13": "6.1", "6.4.0": "6.4", "6.12.118": "6.4",
             "6.13.12": "6.4", "6.14": "6.14", "7.1.9": "6.14", "7.3.4": "7.2"}
    assert {v: kernels.era_for_version(v) for v in table} == table


def test_released_eras_tile_the_versions_and_say_so():
    """Every version has exactly one era (no gap, no overlap), and each era's
    label for people names the version its range starts at."""
    from stepfuzz.oracle.kvm.eras import ERAS
    released = [e for e in ERAS.values() if e.released]
    for v in [(a, b, c) for a in range(3, 9) for b in range(21) for c in (0, 9, 10, 300)]:
        assert len([e for e in released if e.covers(v)]) == 1, v
    for e in released:
        if e.since is not None:
            major, minor, patch = e.since
            assert f"{major}.{minor}" + (f".{patch}" if patch else "") in e.kernels, e.id
    assert not any(e.covers((6, 1, 0)) for e in ERAS.values() if not e.released)


def test_apt_sources_both_formats():
    one = "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://a.example/debian bookworm main\n" \
          "deb http://s.example/debian-security bookworm-security main\n"
    assert kernels._one_line_entries(one) == [("http://a.example/debian", ["bookworm"], "/k.gpg"),
                                              ("http://s.example/debian-security", ["bookworm-security"], None)]
    deb822 = "Types: deb\nURIs: http://a.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n" \
             "Signed-By: /k.gpg\n\nTypes: deb-src\nURIs: http://x.example\nSuites: sid\n"
    assert kernels._deb822_entries(deb822) == [("http://a.example/debian", ["bookworm", "bookworm-updates"], "/k.gpg")]


def test_batch_encoding_is_plain_tokens():
    case = parse_case(make("nop\nldr x1, [x2]", {"x2": "0x20000000", "sp": "0x8000"}, (CODE, MMIO),
                           events=[{"when": "mmio-exit", "n": 1, "what": "signal"}], mmio_read="0x1234"))
    text = encode([(3, case)])
    assert text.startswith("stepfuzz-batch 1\ncase 3 0x10000 1000 ") and text.endswith("go\nend\n")
    assert "reg 2 0x20000000\nreg 31 0x8000\n" in text
    assert "region ram 0x10000 0x10000 1\nregion mmio 0x20000000 0x1000 0\n" in text
    assert "event mmio 1 signal\nwords 2\n0xd503201f 0xf9400041\n" in text


def test_parser_builds_traces_and_catches_garbled_output():
    p = Parser({0: "a.json", 1: "b.json"})
    for line in ["[    3.1] some kernel line", "@@sf ready api 12 cpus 2", "@@sf 0 begin",
                 "@@sf 0 S 0x10004 0xcb000022", "@@sf 0 M r 0x20000000 8 0x1234", "@@sf 0 I",
                 "@@sf 0 S 0x10008 0xca000022", "@@sf 0 E 38", "@@sf 0 end error 5 38",
                 "@@sf 1 begin", "@@sf 1 S 0x10004 0xcb0", "@@sf 1 S zz", "@@sf 1 end end 2", "@@sf done"]:
        p.feed(line + "\r")
    a, b = p.traces[0], p.traces[1]
    assert p.ready and p.done
    assert [(s.pc, s.isv) for s in a.stops] == [(0x10004, 1), (0x10008, 0)]
    assert a.stops[1].exits == (Exit("mmio", "read 8 bytes at 0x20000000: 0x1234"), Exit("eintr"))
    assert a.tail == (Exit("error", "KVM_RUN: ENOSYS"),) and a.end == "error:ENOSYS"
    assert b.end == "error:garbled-output" and b.failed


def test_steps_are_inferred_from_the_reference_path():
    case = parse_case(make("nop\nnop\nnop\nnop"))
    t = RealTrace("x", stops=[Stop(0x10004, 0, HSR_STEPPED), Stop(0x1000c, 0, HSR_STEPPED),
                              Stop(0x1000c, 0, HSR_NOT_STEPPED), Stop(0x10010, 0, HSR_NOT_STEPPED)])
    infer_steps(t, execute(case))
    assert [s.steps for s in t.stops] == [1, 2, 0, 1]
    loop = parse_case(make("self:\nb self", max_steps=3))
    t = RealTrace("y", stops=[Stop(0x10000, 0, HSR_STEPPED)] * 3)
    infer_steps(t, execute(loop))
    assert [s.steps for s in t.stops] == [1, 1, 1]


def test_difference_maps_endings_and_caps_at_max_steps():
    s1, s2 = Stop(0x10004, 1, HSR_STEPPED), Stop(0x10008, 1, HSR_STEPPED)
    real = RealTrace("x", stops=[s1, s2], end="end")
    assert difference(Trace([s1, s2], "end"), real) is None
    assert difference(Trace([s1], "max-steps"), real) is None
    assert "ending" in difference(Trace([s1, s2], "left-code"), real).what
    enosys = RealTrace("x", stops=[s1], tail=(Exit("error", "KVM_RUN: ENOSYS"),), end="error:ENOSYS")
    assert difference(Trace([s1], "no-syndrome", tail=(Exit("error", "KVM_RUN: ENOSYS"),)), enosys) is None
    # MMIO values compare as the bytes on the bus (the model shows the sign-extended register)
    m = Stop(0x10004, 1, HSR_NOT_STEPPED, (Exit("mmio", "read 2 bytes at 0x20000002: 0xffff8899"),))
    r = Stop(0x10004, 1, HSR_NOT_STEPPED, (Exit("mmio", "read 2 bytes at 0x20000002: 0x8899"),))
    assert difference(Trace([m], "end"), RealTrace("x", stops=[r], end="end")) is None
    assert difference(Trace([m], "end"), RealTrace("x", stops=[r._replace(hsr=HSR_STEPPED)], end="end")).what \
        == "ISV 0 (model) vs 1 (real)"
