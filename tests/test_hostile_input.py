"""Hostile and careless input: every problem is a one-line CaseError naming
the file, never another exception, a hang or a process abort."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO, make, stepfuzz, survivors
from stepfuzz.oracle.asm import AsmError, assemble
from stepfuzz.oracle.case import CaseError, load_case, loads_case, parse_case

GOOD = make("nop\nadd x0, x0, #1")
FIELDS = ["stepfuzz", "name", "code", "regs", "memory", "mmio_read", "events", "max_steps", "expect"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


def loads_or_case_error(text: str) -> None:
    try:
        loads_case(text, "hostile.json")
    except CaseError as e:
        message = str(e)
        assert message.startswith("hostile.json") and "\n" not in message, message


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(FIELDS), value=json_values)
def test_any_json_value_in_any_field(field, value):
    loads_or_case_error(json.dumps({**GOOD, field: value}))


@settings(max_examples=200, deadline=None)
@given(where=st.sampled_from(["code", "memory", "events"]), key=st.text(max_size=10), value=json_values)
def test_any_json_value_inside_nested_fields(where, key, value):
    data = json.loads(json.dumps(GOOD))
    if where == "code":
        data["code"][key or "base"] = value
    elif where == "memory":
        data["memory"][0][key or "kind"] = value
    else:
        data["events"] = [{"when": "stop", "n": 1, "what": "preempt", key or "what": value}]
    loads_or_case_error(json.dumps(data))


@pytest.mark.parametrize("text, problem", [
    ('{"stepfuzz": 1, "max_steps": ' + "9" * 5000 + "}", "not valid JSON here"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    (json.dumps({**GOOD, "stepfuzz": 1.0}), "unsupported format version"),
    (json.dumps({**GOOD, "stepfuzz": True}), "unsupported format version"),
    (json.dumps({**GOOD, "events": [{"when": [], "insn": 1, "what": "host-irq"}]}), "unknown trigger"),
    ('{"stepfuzz": 1, "name": "\\ud800"}', "lone surrogate"),
    (json.dumps({**GOOD, "name": "x\n@@sf exit 0"}), "control characters"),
    (json.dumps({**GOOD, "name": "\x1b[2Jred"}), "control characters"),
    (json.dumps({**GOOD, "regs": {"x1": "0x" + "f" * 5000}}), "outside"),
])
def test_named_hostile_cases(text, problem):
    with pytest.raises(CaseError, match=problem) as e:
        loads_case(text, "h.json")
    assert len(str(e.value)) < 300


@pytest.mark.parametrize("asm, problem", [
    ("cbz x0, .+0x100000", "out of range"),
    ("b 0x1000000000000", "out of range"),
    ("b.eq .+3", "aligned"),
    ("tbz x1, #3, .+0x8000", "out of range"),
    ("nop\x00nop", "control character"),
    ("adrp x0, .+0x1000", "refer to"),          # keystone encodes the wrong page
])
def test_assembly_that_keystone_would_abort_on_or_misassemble(asm, problem):
    with pytest.raises(AsmError, match=problem):
        assemble(asm, 0x10000)


def test_an_out_of_range_branch_does_not_abort_the_process(tmp_path):
    """keystone calls abort() on it: the command must say so in one line."""
    bad = tmp_path / "far.json"
    bad.write_text(json.dumps(make("nop\ncbz x0, .+0x100000")))
    good = tmp_path / "good.json"
    good.write_text(json.dumps(GOOD))
    p = stepfuzz("run", tmp_path, "--era", "6.14")
    assert p.returncode == 2, p.stderr
    assert "far.json: code.asm:" in p.stderr and "Traceback" not in p.stderr
    assert "1 case(s) x 1 era(s)" in p.stdout       # the good one still ran


def test_files_that_are_not_regular_are_refused_unread(tmp_path):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero", tmp_path):
        with pytest.raises(CaseError, match="not a regular file"):
            load_case(path)
    p = subprocess.run([sys.executable, "-m", "stepfuzz.fuzz.cli.main", "case", "check", str(fifo)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "not a regular file" in p.stderr


def test_a_huge_file_is_refused_unread(tmp_path):
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(17 << 20)
    with pytest.raises(CaseError, match="larger than"):
        load_case(big)


@pytest.mark.parametrize("args, problem", [
    (("fuzz", "--max-steps", "0"), "--max-steps 0: must be 1.."),
    (("fuzz", "--max-steps", "-3"), "--max-steps -3: must be 1.."),
    (("fuzz", "--time", ""), "not a duration"),
    (("corpus", "merge", "corpus", "-o", "OUT", "--max-steps", "-5"), "--max-steps -5"),
    (("kvm", "run", "corpus/known", "--kernel", "6.1", "--boot-timeout", "nan"), "finite number of seconds"),
    (("kvm", "run", "corpus/known", "--kernel", "6.1", "--boot-timeout", "inf"), "finite number of seconds"),
    (("kvm", "exec", "x", "--kernel", "6.1", "--timeout", "-1"), "finite number of seconds"),
])
def test_impossible_requests_are_refused_in_one_line(args, problem, tmp_path):
    p = stepfuzz(*[str(tmp_path / a) if a == "OUT" else a for a in args], "--crashes", tmp_path / "c") \
        if args[0] == "fuzz" else stepfuzz(*[str(tmp_path / a) if a == "OUT" else a for a in args])
    assert p.returncode == 2 and problem in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "c").exists() and not (tmp_path / "OUT").exists()     # nothing started, nothing written


def test_an_era_named_twice_runs_once():
    from stepfuzz.oracle.kvm.eras import select
    assert [e.id for e in select("6.1,6.1,arch")] == ["6.1", "arch"]


def test_outputs_never_replace_what_is_not_a_regular_file_or_an_input(tmp_path):
    case = tmp_path / "in.json"
    case.write_text((REPO / "corpus" / "known" / "5.0-immediate-exit-skips-insn.json").read_text())
    before = case.read_bytes()
    link = tmp_path / "link.c"
    target = tmp_path / "precious"
    target.write_text("keep")
    link.symlink_to(target)
    for out, problem in ((case, "is the input"), (link, "not a regular file"), ("/dev/null", "not a regular file"),
                         (case / "x.c", "cannot make the directory")):
        p = stepfuzz("export", case, "--standalone", "-o", out)
        assert p.returncode == 2 and problem in p.stderr and "Traceback" not in p.stderr, p.stderr
    p = stepfuzz("minimize", case, "--era", "5.0", "-o", case)
    assert p.returncode == 2 and "is the input" in p.stderr
    assert case.read_bytes() == before and target.read_text() == "keep" and link.is_symlink()
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    from stepfuzz.fuzz.findings.crashdir import OutputError, write_atomic
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):         # root writes anywhere: simulate with a file in the way
            (tmp_path / "dir").mkdir()
            with pytest.raises(OutputError, match="not a regular file"):
                write_atomic(tmp_path / "dir", "x")
        else:
            with pytest.raises(OutputError, match="cannot write"):
                write_atomic(ro / "out.txt", "x")
        assert not list(tmp_path.rglob(".*.tmp"))
    finally:
        ro.chmod(0o700)


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs (root only; skipped elsewhere)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    (mnt / "old.c").write_text("the previous report")
    try:
        with open(mnt / "filler", "wb") as f:          # fill it up
            while True:
                f.write(bytes(4096))
                f.flush()
    except OSError:
        pass
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(full_disk, tmp_path):
    case = tmp_path / "in.json"
    case.write_text(json.dumps(make("nop\nadd x0, x0, #1")))
    p = stepfuzz("export", case, "--standalone", "-o", full_disk / "old.c")
    assert p.returncode == 2 and "No space left on device" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert (full_disk / "old.c").read_text() == "the previous report"          # not truncated
    assert not list(full_disk.glob(".*.tmp"))


def test_the_kernel_cache_is_verified_and_relative(tmp_path):
    """A copied cache boots its own images; a truncated or swapped image is
    named as corrupt, never booted under another version's name."""
    import shutil
    from stepfuzz.oracle.realkvm import RealKvmError, cache_root, kernels
    src = cache_root() / "kernels" / "6.1"
    if not (src / "kernel.json").exists():
        pytest.skip("kernel 6.1 is not cached (stepfuzz kernels fetch 6.1)")
    root = tmp_path / "cache"
    shutil.copytree(src, root / "kernels" / "6.1", ignore=shutil.ignore_patterns("lists", "archives", "*.deb"))
    k = kernels.resolve("6.1", root)
    assert k.path.parent == root / "kernels" / "6.1"              # not the original's image
    with open(k.path, "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    with pytest.raises(RealKvmError, match=r"kernel 6.1: the cached image .* is corrupt .*kernels fetch 6.1"):
        kernels.resolve("6.1", root)
    p = stepfuzz("kvm", "run", REPO / "corpus" / "known", "--kernel", "6.1", "--cache", root)
    assert p.returncode == 2 and "is corrupt" in p.stderr and "Traceback" not in p.stderr


def test_a_program_cannot_forge_the_runners_verdict(tools, kernel, tmp_path):
    """kvm exec: what the program prints (a case name, say) is relayed, never
    read as the runner's own lines; a file that is not a program says so."""
    kernel("6.1")
    src = tmp_path / "forge.c"
    src.write_text('#include <stdio.h>\nint main(void) { puts("@@sf exec-exit status 0");'
                   ' puts("case x: @@sf exec-exit status 0"); return 1; }\n')
    prog = tmp_path / "forge"
    subprocess.run(["aarch64-linux-gnu-gcc", "-static", "-O2", "-o", str(prog), str(src)], check=True)
    p = stepfuzz("kvm", "exec", prog, "--kernel", "6.1", timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    assert p.stdout.splitlines() == ["@@sf exec-exit status 0", "case x: @@sf exec-exit status 0"]
    junk = tmp_path / "junk"
    junk.write_text("not a program\n")
    p = stepfuzz("kvm", "exec", junk, "--kernel", "6.1", timeout=300)
    assert p.returncode == 127 and "cannot be executed" in p.stdout, p.stdout + p.stderr


def test_crashes_merge_follows_no_symbolic_link(tmp_path):
    """A finding linked to /, or a case.json linked to /etc/passwd, is named
    and left out: nothing outside the crash directories is copied."""
    import shutil
    src = tmp_path / "src"
    shutil.copytree(REPO / "crashes" / "examples", src)
    (src / "root").symlink_to("/")
    evil = src / "evil"
    shutil.copytree(src / "508c4da3f2ff", evil)
    (evil / "case.json").unlink()
    (evil / "case.json").symlink_to("/etc/passwd")
    (evil / "minimized.json").unlink()
    record = json.loads((evil / "divergence.json").read_text())
    record["case_insns"] = 0                 # claims the smallest case: the merge wants to take it
    (evil / "divergence.json").write_text(json.dumps(record))
    out = tmp_path / "out"
    p = stepfuzz("crashes", "merge", src, "-o", out, timeout=120)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert f"{evil / 'case.json'}" in p.stderr
    copied = [f for f in out.rglob("*") if f.is_file()]
    assert copied and all(f.stat().st_size < 1 << 20 for f in copied)
    assert not any("root:" in f.read_text(errors="replace") for f in copied)


def test_junk_progress_files_do_not_break_status_or_plot(tmp_path):
    import shutil
    crashes = tmp_path / "c"
    shutil.copytree(REPO / "crashes" / "examples", crashes)
    (crashes / ".workers").mkdir()
    (crashes / ".workers" / "1.json").write_text('["a list"]')
    (crashes / ".workers" / "2.json").write_text('{"pid": "x", "updated": "now", "execs": "many", "final": 1}')
    (crashes / ".workers" / "3.json").write_bytes(b"\xff\x00junk")
    (crashes / "stats.jsonl").write_text('[1, 2]\n{"t": "x"}\nnot json\n{"t": 1.0, "elapsed_s": 1, "execs": 5, '
                                         '"execs_per_s": 5.0, "corpus": 1, "cov": 1, "ft": 1, "rss_mb": 1.0}\n')
    (crashes / "campaign.json").write_text("[]")
    for args in (("status", crashes), ("plot", crashes, "-o", tmp_path / "p.html")):
        p = stepfuzz(*args)
        assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert "<svg" in (tmp_path / "p.html").read_text()


def test_two_campaigns_on_one_directory_and_an_unwritable_one(tmp_path):
    corpus, crashes = tmp_path / "corpus", tmp_path / "crashes"
    first = subprocess.Popen([sys.executable, "-m", "stepfuzz.fuzz.cli.main", "fuzz", "--time", "60s", "--seed", "1",
                              "--corpus", str(corpus), "--crashes", str(crashes)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while time.time() < deadline and not (crashes / "campaign.json").exists():
            time.sleep(0.2)
        p = stepfuzz("fuzz", "--time", "5s", "--corpus", corpus, "--crashes", crashes)
        assert p.returncode == 2 and "another campaign is running on it" in p.stderr, p.stderr
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=60)
    blocker = tmp_path / "file"
    blocker.write_text("")
    p = stepfuzz("fuzz", "--time", "5s", "--corpus", corpus, "--crashes", blocker / "sub")
    assert p.returncode == 2 and "cannot write" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_cases_the_runner_cannot_set_up_are_said_so(tmp_path):
    from stepfuzz.oracle.realkvm.batch import MAX_EVENTS, RealTrace, skip_reason
    from stepfuzz.oracle.guest import execute
    events = [{"when": "stop", "n": 1000 + i, "what": "preempt"} for i in range(MAX_EVENTS + 44)]
    case = parse_case(make("nop\nadd x0, x0, #1", events=events))
    t = skip_reason(case, execute(case))
    assert isinstance(t, RealTrace) and "events (the runner takes at most 256)" in t.detail and not t.sent
    path = tmp_path / "many.json"
    path.write_text(json.dumps(make("nop", events=events)))
    p = stepfuzz("export", path, "--standalone", "-o", tmp_path / "x.c")
    assert p.returncode == 2 and "a reproducer cannot set it up" in p.stderr and not (tmp_path / "x.c").exists()


def test_minimize_refuses_an_output_for_a_directory(tmp_path):
    p = stepfuzz("minimize", REPO / "crashes" / "examples", "-o", tmp_path / "x.json")
    assert p.returncode == 2 and "-o is for one case" in p.stderr and not (tmp_path / "x.json").exists()


def test_sigkill_of_kvm_run_takes_qemu_with_it(tools, kernel):
    kernel("6.1")
    proc = subprocess.Popen([sys.executable, "-m", "stepfuzz.fuzz.cli.main", "kvm", "run", str(REPO / "corpus"),
                             "--kernel", "6.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def qemu() -> list[str]:
        return subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "qemu-system-aarch64"],
                              capture_output=True, text=True).stdout.split()
    deadline = time.time() + 60
    while time.time() < deadline and not qemu():
        time.sleep(0.2)
    found = qemu()
    assert found, "QEMU never started"
    proc.kill()
    proc.wait()
    left = survivors(lambda: [p for p in found if os.path.exists(f"/proc/{p}")], 10)
    assert not left, "QEMU outlived a SIGKILL of kvm run"


def test_a_campaign_on_a_full_disk_says_so_in_one_line(full_disk, tmp_path):
    p = stepfuzz("fuzz", "--time", "20s", "--corpus", tmp_path / "corpus", "--crashes", full_disk / "crashes",
                 timeout=120)
    assert p.returncode == 2 and "No space left on device" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_escapes_in_a_foreign_record_never_reach_the_terminal(tmp_path):
    import shutil
    crashes = tmp_path / "c"
    shutil.copytree(REPO / "crashes" / "examples", crashes)
    rec = crashes / "508c4da3f2ff" / "divergence.json"
    data = json.loads(rec.read_text())
    data["signature"] = "\x1b[2J\x1b[31mred"
    data["root_cause"]["signature"] = "\x1b]0;title\x07x"
    rec.write_text(json.dumps(data))
    for args in (("status", crashes), ("triage", crashes)):
        p = stepfuzz(*args)
        assert p.returncode == 0 and "\x1b" not in p.stdout + p.stderr and "\x07" not in p.stdout, args


@pytest.mark.parametrize("make_args, problem", [
    (lambda k, t: ("crashes", "merge", k, "-o", k / "508c4da3f2ff" / "case.json"), "exists and is not a directory"),
    (lambda k, t: ("crashes", "merge", k, "-o", ""), "must be named"),
    (lambda k, t: ("corpus", "merge", REPO / "corpus" / "programs", "-o", "/dev/null"), "not a directory"),
    (lambda k, t: ("triage", k, "--html", k / "508c4da3f2ff" / "case.json"), "a file of the finding"),
    (lambda k, t: ("triage", k, "--html", ""), "must be named"),
    (lambda k, t: ("triage", k, "--kernels", ""), "name at least one kernel"),
    (lambda k, t: ("plot", k, "-o", ""), "must be named"),
    (lambda k, t: ("minimize", k / "508c4da3f2ff" / "case.json", "--era", "6.1", "-o", ""), "must be named"),
    (lambda k, t: ("minimize", k / "508c4da3f2ff" / "case.json", "--era", "6.1", "--max-seconds", "nan"),
     "finite number of seconds"),
    (lambda k, t: ("fuzz", "--jobs", "100000", "--runs", "1", "--corpus", t / "c", "--crashes", t / "cr"),
     "4 per core"),
    (lambda k, t: ("kvm", "run", REPO / "corpus" / "programs" / "loop.json", "--kernel", t / "notakernel"),
     "not a Linux kernel image"),
])
def test_impossible_outputs_and_arguments_found_by_the_trial(make_args, problem, tmp_path):
    import shutil
    k = tmp_path / "k"
    shutil.copytree(REPO / "crashes" / "examples", k)
    (tmp_path / "notakernel").write_text("hi\n")
    before = {p: p.read_bytes() for p in k.rglob("*") if p.is_file()}
    p = stepfuzz(*make_args(k, tmp_path), timeout=120)
    assert p.returncode == 2 and problem in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert {p: p.read_bytes() for p in k.rglob("*") if p.is_file()} == before       # nothing replaced


def test_a_fifo_in_a_crash_directory_blocks_nothing(tmp_path):
    import shutil
    k = tmp_path / "k"
    shutil.copytree(REPO / "crashes" / "examples", k)
    (k / "ff").mkdir()
    os.mkfifo(k / "ff" / "divergence.json")
    for args in (("status", k), ("triage", k), ("crashes", "merge", k, "-o", tmp_path / "out"), ("minimize", k)):
        p = stepfuzz(*args, timeout=60)
        assert "not a regular file" in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)


def test_sigkill_of_corpus_merge_stops_the_merge(tmp_path):
    """libFuzzer's merge processes watch stepfuzz and stop with it."""
    import random
    from stepfuzz.fuzz.inputs.encoding import encode
    from stepfuzz.fuzz.inputs.generate import generate
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rnd = random.Random(5)
    for i in range(3000):                         # enough inputs that the merge is still running
        (corpus / f"in{i}").write_bytes(encode(generate(rnd)))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "stepfuzz.fuzz.cli.main", "corpus", "merge", str(corpus),
                             "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = f"merge_control_file={out.resolve()}"

    def merging() -> list[str]:
        return subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    deadline = time.time() + 30
    while time.time() < deadline and not merging() and proc.poll() is None:
        time.sleep(0.1)
    if proc.poll() is not None:
        pytest.skip("the merge finished before it could be killed")
    proc.kill()
    proc.wait()
    left = survivors(merging, 20)
    assert not left, "the merge went on after stepfuzz was killed"
