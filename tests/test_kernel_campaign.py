"""`stepfuzz fuzz --kernel`: campaigns whose target is a real kernel.

The real tests run short campaigns on Debian's 6.1 under QEMU (each boots its
own VM: a campaign is its own process); the rest check the host side's
pieces without a kernel.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, stepfuzz, survivors
from stepfuzz.oracle.kvm.eras import ERAS
from stepfuzz.oracle.realkvm.batch import RealTrace
from stepfuzz.oracle.realkvm.kernels import parse_version
from stepfuzz.oracle.trace import HSR_STEPPED, Stop


def findings(crashes: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(crashes.glob("*/divergence.json"))]


def test_a_short_campaign_on_6_1_finds_a_known_divergence_from_an_empty_corpus(kernel, tmp_path):
    """CI's real-kernel campaign: from nothing, within a few hundred cases, a
    divergence that 6.1 really shows and that the era table says was fixed
    after 6.1, filed under the kernel's version and image hash."""
    k = kernel("6.1")
    p = stepfuzz("fuzz", "--kernel", "6.1", "--runs", "300", "--seed", "7", "--corpus", tmp_path / "c",
                 "--crashes", tmp_path / "k", cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "seed 7 (reuse with --seed 7)" in p.stderr
    assert f"300 cases on 6.1 (Linux {k.version}) vs era {k.era}" in p.stderr
    assert "VM time" in p.stderr and "inside KVM_RUN" in p.stderr
    found = findings(tmp_path / "k")
    assert found, p.stderr[-2000:]
    assert all(f["kernel"]["sha256"] == k.sha256 and f["kernel"]["version"] == k.version for f in found)
    era = ERAS[k.era]
    confirmed = [f for f in found if f["root_cause"]["fixed_by"]
                 and parse_version(f["root_cause"]["fixed_in"]) > parse_version(k.version)]
    assert confirmed, [f["root_cause"]["signature"] for f in found]
    assert all(era.id in f["eras"] for f in confirmed)
    assert any((tmp_path / "c").iterdir()), "the real traces' behaviours kept no input"
    status = stepfuzz("status", tmp_path / "k")
    assert f"target: Linux {k.version}" in status.stdout and "on Linux" in status.stdout
    triage = stepfuzz("triage", tmp_path / "k")
    assert f"Linux {k.version}: shows it (campaign" in triage.stdout
    # the same seed on the same kernel from the same (empty) start: the same inputs
    again = stepfuzz("fuzz", "--kernel", "6.1", "--runs", "64", "--seed", "7", "--corpus", tmp_path / "c2",
                     "--crashes", tmp_path / "k2", cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    first = sorted(f.name for f in (tmp_path / "c2").iterdir())
    third = stepfuzz("fuzz", "--kernel", "6.1", "--runs", "64", "--seed", "7", "--corpus", tmp_path / "c3",
                     "--crashes", tmp_path / "k3", cwd=tmp_path, timeout=600)
    assert third.returncode == 0 and sorted(f.name for f in (tmp_path / "c3").iterdir()) == first


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return out


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for q in pids:
        try:
            os.kill(q, 0)
            state = Path(f"/proc/{q}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z":
                alive.append(q)
        except (OSError, IndexError):
            pass
    return alive


def test_sigkill_of_the_campaign_takes_its_vms_with_it(kernel, tmp_path):
    kernel("6.1")
    proc = subprocess.Popen([sys.executable, "-m", "stepfuzz.fuzz.cli.main", "fuzz", "--kernel", "6.1", "--time",
                             "5m", "--jobs", "2", "--corpus", str(tmp_path / "c"), "--crashes", str(tmp_path / "k")],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    qemus: list[int] = []
    deadline = time.monotonic() + 120
    while len(qemus) < 2 and time.monotonic() < deadline:
        time.sleep(1)
        qemus = [q for q in _children(proc.pid)
                 if b"qemu-system-aarch64" in Path(f"/proc/{q}/cmdline").read_bytes()]
    assert len(qemus) == 2, "the campaign did not start its two VMs"
    time.sleep(3)
    proc.kill()
    proc.wait(timeout=30)
    assert survivors(lambda: _alive(qemus), 20) == []
    # what it had kept is whole: every record readable, a resumed campaign starts cleanly
    for f in findings(tmp_path / "k"):
        assert f["kernel"]["name"] == "6.1"
    p = stepfuzz("status", tmp_path / "k")
    assert p.returncode == 0 and "Traceback" not in p.stderr


def test_a_vm_killed_mid_batch_is_restarted_and_counted(kernel, tmp_path):
    kernel("6.1")
    proc = subprocess.Popen([sys.executable, "-m", "stepfuzz.fuzz.cli.main", "fuzz", "--kernel", "6.1", "--time",
                             "45", "--corpus", str(tmp_path / "c"), "--crashes", str(tmp_path / "k"), "--seed", "3"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    qemu: list[int] = []
    deadline = time.monotonic() + 120
    while not qemu and time.monotonic() < deadline:
        time.sleep(0.5)
        qemu = [q for q in _children(proc.pid) if b"qemu-system-aarch64" in Path(f"/proc/{q}/cmdline").read_bytes()]
    assert qemu
    stats = tmp_path / "k" / "stats.jsonl"
    while time.monotonic() < deadline:          # booted, and in the middle of a batch
        time.sleep(0.5)
        if stats.exists() and any(json.loads(l).get("execs") for l in stats.read_text().splitlines()):
            break
    os.kill(qemu[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err
    assert "vm0 restarted: the VM died (" in err
    last = json.loads((tmp_path / "k" / "stats.jsonl").read_text().splitlines()[-1])
    assert last["restarts"] >= 1 and last["boots"] >= 2 and last["execs"] > 0
    # what the VM was running when it died is kept, with the console
    deaths = sorted((tmp_path / "k" / "vm-deaths").iterdir())
    assert [p.suffix for p in deaths] == [".json", ".txt"]
    assert "console (last lines)" in deaths[1].read_text()


def test_a_kernel_that_does_not_boot_is_one_line_and_exit_2(tools, tmp_path):
    image = tmp_path / "Image"
    image.write_bytes(b"\0" * 4096 + b"Linux version 6.1.0-99-arm64 (nobody) #1 SMP\0" + b"\0" * 4096)
    p = stepfuzz("fuzz", "--kernel", image, "--boot-timeout", "3", "--time", "60", "--corpus", tmp_path / "c",
                 "--crashes", tmp_path / "k", cwd=tmp_path, timeout=300)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert "did not boot 3 times in a row" in last and "boot-timeout" in last


# ---------------------------------------------------------------- without a kernel

def test_behaviours_tell_kinds_of_stop_and_their_order_apart():
    from stepfuzz.fuzz.campaign.realkernel import behaviours
    plain = Stop(0x10004, 1, HSR_STEPPED)
    zero = Stop(0x10004, 0, HSR_STEPPED)
    a = RealTrace("a", stops=[plain, zero], end="end")
    b = RealTrace("b", stops=[zero, plain], end="end")
    assert behaviours(a, "agrees") != behaviours(b, "agrees")         # the same kinds, another order
    assert behaviours(a, "agrees") == behaviours(RealTrace("c", stops=[plain, zero], end="end"), "agrees")
    assert behaviours(a, "agrees") != behaviours(a, "confirmed")


def test_junk_corpus_entries_are_named_and_skipped(tmp_path):
    from stepfuzz.fuzz.campaign.realkernel import Corpus
    (tmp_path / "junk.json").write_text("{not json")
    (tmp_path / "good.json").write_text(next((REPO / "corpus" / "programs").glob("*.json")).read_text())
    said = []
    c = Corpus(tmp_path, said.append)
    assert c.loaded == 1 and c.skipped == 1
    assert len(said) == 1 and "junk.json" in said[0] and "skipped" in said[0]


def test_kernel_only_flags_are_refused_for_in_process_campaigns(tmp_path):
    p = stepfuzz("fuzz", "--batch", "8", "--time", "1", "--corpus", tmp_path / "c", "--crashes", tmp_path / "k")
    assert p.returncode == 2 and "--batch is for campaigns on a real kernel" in p.stderr


def test_in_process_flags_are_refused_for_kernel_campaigns(tmp_path):
    p = stepfuzz("fuzz", "--kernel", "6.1", "--era", "5.10", "--corpus", tmp_path / "c", "--crashes", tmp_path / "k")
    assert p.returncode == 2 and "for in-process campaigns" in p.stderr


def test_bench_on_a_kernel_measures_cases_per_minute_and_what_dominates(kernel):
    kernel("6.1")
    p = stepfuzz("bench", "--kernel", "6.1", "--jobs", "1", "--campaign", "15", "--json", timeout=600)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["cases"] > 0 and r["cases_per_min_boot_excluded"] >= r["cases_per_min"] > 0
    # the stages of a case and the channel make up a batch's round trip
    stages = ("vm_setup", "prefault", "stepping", "vm_teardown", "channel")
    assert 0.9 <= sum(r[f"share_{k}"] for k in stages) <= 1.05
    assert all(r[f"share_{k}"] > 0 for k in ("vm_setup", "stepping", "vm_teardown"))
    assert 0 < r["share_kvm_run"] < r["share_prefault"] + r["share_stepping"] + 0.05
    assert r["ms_per_case_per_vm"] > 0
