"""Campaigns: encoding, mutation, crash store, and real atheris runs from the command line."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CORPUS, stepfuzz, survivors
import stepfuzz.fuzz.inputs.mutate as mutate
from stepfuzz.fuzz.findings.crashdir import root_id
from stepfuzz.fuzz.findings.store import CrashStore
from stepfuzz.fuzz.harness.confirm import Keeper
from stepfuzz.oracle.kvm.attribute import attribute, root_cause
from stepfuzz.fuzz.inputs.encoding import EVENT_KINDS, MAGIC, NotACase, decode, decode_input, encode
from stepfuzz.fuzz.inputs.generate import generate
from stepfuzz.oracle.case import IPA_LIMIT, PAGE, load_case, parse_case
from stepfuzz.oracle.kvm.eras import select
from stepfuzz.oracle.run import check


# ---------------------------------------------------------------- encoding

def test_every_byte_string_decodes_to_a_valid_case():
    rnd = random.Random(2)
    for _ in range(3000):
        data = bytes(rnd.getrandbits(8) for _ in range(rnd.choice((0, 1, 7, 40, 300))))
        case = decode(data)
        parse_case(case.to_json())          # valid by the case format's own checks


def test_code_finds_room_beside_regions_that_span_the_address_space():
    # one mmio region from 96 KiB up to 64 KiB below the top, then one over everything:
    # the code goes above the first, and displaces the second
    pages = IPA_LIMIT // PAGE
    for first, count, placed in ((0x18, pages - 0x18 - 0x10, IPA_LIMIT - 0x10000), (0, pages, 0x10000)):
        data = MAGIC + bytes([1, 1]) + first.to_bytes(4, "little") + (count - 1).to_bytes(4, "little")
        case = decode(data)
        parse_case(case.to_json())
        assert case.base == placed
        code = next(r for r in case.memory if r.base <= case.base < r.end)
        assert code.kind == "ram" and all(r is code or r.end <= code.base or r.base >= code.end for r in case.memory)


def test_every_case_encodes_back():
    rnd = random.Random(3)
    cases = [load_case(p) for p in CORPUS.rglob("*.json")] + [generate(rnd) for _ in range(200)]
    for c in cases:
        back = decode(encode(c))
        assert (back.base, back.words, back.regs, back.memory, back.mmio_read, back.events, back.max_steps) == \
               (c.base, c.words, c.regs, c.memory, c.mmio_read, c.events, c.max_steps)


def test_json_seeds_are_read_as_cases_and_broken_ones_refused():
    path = CORPUS / "known" / "6.1-immediate-exit-after-mmio.json"
    assert decode_input(path.read_bytes()).words == load_case(path).words
    with pytest.raises(NotACase):
        decode_input(b'{"stepfuzz": 1, "code": {}}')


# ---------------------------------------------------------------- generation and mutation

def test_generator_covers_every_region_and_event_kind():
    rnd = random.Random(4)
    kinds, events, exits = set(), set(), 0
    for _ in range(300):
        c = generate(rnd)
        parse_case(c.to_json())
        kinds |= {r.kind for r in c.memory}
        events |= {(e.when, e.what) for e in c.events}
        exits += sum(1 for s in check(c, select("arch"))[0].log.specials.values() if s.kind in ("mmio", "dbgreg", "hvc"))
    assert kinds == {"ram", "mmio", "mmio-kernel"}
    assert set(EVENT_KINDS) <= events
    # and the debugger's own actions, at every kind of exit
    assert {(when, what) for when in ("start", "stop", "mmio-exit", "hypercall-exit", "eintr")
            for what in ("set-reg", "debug")} <= events
    assert exits > 300


def test_mutator_and_crossover_keep_inputs_valid_and_bounded(monkeypatch):
    monkeypatch.setattr(mutate, "BYTE_LEVEL_SHARE", 0.0)
    rnd = random.Random(5)
    pool = [b"", (CORPUS / "programs" / "loop.json").read_bytes()]
    for i in range(1500):
        if rnd.random() < 0.85:
            out = mutate.custom_mutator(rnd.choice(pool), 2048, i)
        else:
            out = mutate.custom_crossover(rnd.choice(pool), rnd.choice(pool), 2048, i)
        assert len(out) <= 2048
        parse_case(decode(out).to_json())
        pool = (pool + [out])[-40:]


# ---------------------------------------------------------------- crash store

def test_crash_store_dedups_across_workers_and_keeps_the_smallest(tmp_path):
    big = load_case(CORPUS / "known" / "6.1-immediate-exit-after-mmio.json")
    small = parse_case({**big.to_json(), "code": {"base": "0x10000", "asm": "ldr x1, [x2]\nadd x0, x0, #1"}})
    (rb,) = check(big, select("6.1"))
    (rs,) = check(small, select("6.1"))
    assert rb.divergence.signature == rs.divergence.signature
    a, b = Keeper(CrashStore(tmp_path, "a")), Keeper(CrashStore(tmp_path, "b"))
    assert a.record(rb) == "v6.14:2ca3f03bf524/multi-step"
    assert b.record(rb) is None and b.record(rs) is None
    a.flush(); b.flush()
    (d,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    info = json.loads((d / "divergence.json").read_text())
    assert info["count"] == 3 and info["signature"] == "6.1/multi-step/immediate-exit+mmio"
    assert info["root_cause"]["signature"] == "v6.14:2ca3f03bf524/multi-step" and info["eras"] == {"6.1": 3}
    assert d.name == info["id"] == root_id(info["root_cause"]["signature"])
    assert info["case_insns"] == 2 and load_case(d / "case.json").words == small.words
    shown = {k: rs.divergence.to_json()[k] for k in ("stop", "expected", "got")}
    assert shown != {k: rb.divergence.to_json()[k] for k in shown}       # the two cases diverge at different stops
    assert {k: info[k] for k in shown} == shown                          # the record describes the kept case
    assert "<< multi-step" in (d / "report.txt").read_text()
    assert not list(d.glob(".*.tmp"))


def test_a_divergence_that_does_not_reproduce_is_never_kept(tmp_path):
    """An oracle that leaks state between executions shows a divergence its
    case does not have: the harness checks a case again before the store
    keeps it, for a new signature and for a smaller case replacing a kept
    one.  (The leak is simulated: the result is paired with a case that
    agrees.)"""
    from dataclasses import replace
    from stepfuzz.fuzz.harness.confirm import Keeper, UnstableDivergence
    known = load_case(CORPUS / "known" / "6.1-immediate-exit-after-mmio.json")
    (r,) = check(known, select("6.1"))
    calm = replace(known, events=())
    assert check(calm, select("6.1"))[0].divergence is None
    store = CrashStore(tmp_path, "a")
    keeper = Keeper(store)
    with pytest.raises(UnstableDivergence, match=r"6.1/multi-step/immediate-exit\+mmio did not reproduce .*agrees"):
        keeper.record(replace(r, case=calm))
    assert not [p for p in tmp_path.iterdir() if p.is_dir()] and not store.seen
    assert keeper.record(r) == "v6.14:2ca3f03bf524/multi-step"     # the genuine one is still new
    small_calm = replace(calm, words=calm.words[:1])
    assert len(small_calm.words) < len(known.words) and check(small_calm, select("6.1"))[0].divergence is None
    assert keeper.record(replace(r, case=small_calm)) is None
    keeper.flush()
    (d,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert load_case(d / "case.json").words == known.words            # the smaller case was not kept
    assert json.loads((d / "divergence.json").read_text())["count"] == 2


# ---------------------------------------------------------------- real campaigns

def _divergences(crashes: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in crashes.glob("*/divergence.json")]


def test_campaign_from_an_empty_corpus_records_and_replays(tmp_path):
    corpus, crashes = tmp_path / "corpus", tmp_path / "crashes"
    p = stepfuzz("fuzz", "--era", "4.15,arch", "--runs", "400", "--seed", "11", "--corpus", corpus, "--crashes", crashes)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "seed 11 (reuse with --seed 11)" in p.stderr
    divs = _divergences(crashes)
    roots = {d["root_cause"]["signature"] for d in divs}
    assert "v5.0:bd7d95cafb49/zero-step" in roots, roots           # 4.15's zero-step after a stage-2 fault
    assert not any("arch" in d["eras"] for d in divs), roots
    assert len(list(corpus.iterdir())) > 10
    for d in divs:                      # every finding replays to its signature and root cause
        case = crashes / d["id"] / "case.json"
        out = stepfuzz("run", case, "--era", d["era"], "--json")
        assert out.returncode == 1
        assert json.loads(out.stdout)["divergence"]["signature"] == d["signature"]
        (r,) = check(load_case(case), select(d["era"]))
        assert root_cause(attribute(r.case, r.era, r.divergence), r.divergence).signature == d["root_cause"]["signature"]
        assert d["first_found"]["elapsed_s"] >= 0 and d["count"] >= 1
    records = [json.loads(l) for l in (crashes / "stats.jsonl").read_text().splitlines()]
    assert records[-1]["final"] and records[-1]["execs"] >= 400
    st = stepfuzz("status", crashes)
    assert st.returncode == 0 and "not running" in st.stdout and "v5.0:bd7d95cafb49/zero-step" in st.stdout
    pl = stepfuzz("plot", crashes, "-o", tmp_path / "plot.html")
    assert pl.returncode == 0 and "<svg" in (tmp_path / "plot.html").read_text()


def test_resume_keeps_everything_and_skips_junk_with_a_warning(tmp_path):
    corpus, crashes = tmp_path / "corpus", tmp_path / "crashes"
    corpus.mkdir()
    (corpus / "broken.json").write_text('{"stepfuzz": 1, "code": ')
    # keystone raises its own UnicodeEncodeError on non-ASCII text: once, it ended a campaign
    (corpus / "accent.json").write_text(json.dumps({"stepfuzz": 1, "code": {"base": "0x10000", "asm": "nop \u00e9"},
                                                    "memory": [{"base": "0x10000", "size": "0x10000", "kind": "ram"}]}))
    (corpus / "seed.json").write_bytes((CORPUS / "known" / "5.11-irq-after-retire-multi-step.json").read_bytes())
    args = ("fuzz", "--era", "5.11", "--runs", "150", "--corpus", corpus, "--crashes", crashes)
    first = stepfuzz(*args, "--seed", "1")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "broken.json: not valid JSON" in first.stderr and "left in place" in first.stderr
    assert "accent.json: code.asm: not ASCII" in first.stderr
    assert "resuming" not in first.stderr            # seeds alone are not an earlier campaign
    entries = set(p.name for p in corpus.iterdir())
    sigs = {s for d in _divergences(crashes) for s in d["signatures"]}
    assert "5.11/multi-step/irq-pending" in sigs
    roots = {d["root_cause"]["signature"] for d in _divergences(crashes)}
    assert "v6.1:34fbdee086cf+370531d1e95b/multi-step" in roots
    second = stepfuzz(*args, "--seed", "2")
    assert second.returncode == 0
    assert "resuming" in second.stderr
    assert entries <= set(p.name for p in corpus.iterdir())          # nothing lost, junk kept
    assert sigs <= {s for d in _divergences(crashes) for s in d["signatures"]}
    assert roots <= {d["root_cause"]["signature"] for d in _divergences(crashes)}
    assert len(_divergences(crashes)) == len({d["root_cause"]["signature"] for d in _divergences(crashes)})


def test_sigkill_in_the_middle_loses_nothing_written(tmp_path):
    corpus, crashes = tmp_path / "corpus", tmp_path / "crashes"
    proc = subprocess.Popen([sys.executable, "-m", "stepfuzz.fuzz.cli.main", "fuzz", "--time", "120s", "--seed", "5",
                             "--corpus", str(corpus), "--crashes", str(crashes)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 90
    while time.time() < deadline and len(_divergences(crashes) if crashes.exists() else []) < 5:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1)
    divs = _divergences(crashes)          # every file that exists parses
    assert len(divs) >= 5
    for d in divs:
        load_case(crashes / d["id"] / "case.json")
    after = stepfuzz("fuzz", "--runs", "50", "--seed", "6", "--corpus", corpus, "--crashes", crashes)
    assert after.returncode == 0, after.stderr[-2000:]
    assert {d["id"] for d in divs} <= {d["id"] for d in _divergences(crashes)}


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_stop_request_ends_the_campaign_and_flushes_its_counts(tmp_path, jobs):
    """Ctrl-C (SIGINT to `stepfuzz fuzz`) ends every worker at its next input,
    whatever it is doing: the default KeyboardInterrupt was lost now and then
    inside the custom mutator, and the campaign ran on; with -jobs, a SIGINT
    to the shells libFuzzer runs its workers in crashed libFuzzer's parent.
    Several stops, at different moments, each must end promptly and cleanly
    with every worker's final counts written."""
    for i in range(3):
        crashes = tmp_path / f"crashes{i}"
        proc = subprocess.Popen([sys.executable, "-m", "stepfuzz.fuzz.cli.main", "fuzz", "--time", "120s", "--seed", str(i + 1),
                                 "--jobs", str(jobs), "--corpus", str(tmp_path / f"corpus{i}"), "--crashes", str(crashes)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline and len(list(crashes.glob(".workers/*.json"))) < jobs:
            time.sleep(0.1)
        time.sleep(0.5 * i)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)         # well before the supervisor's 30 s kill
        assert proc.returncode == 0, err[-2000:]
        assert "did not stop" not in err
        workers = [json.loads(p.read_text()) for p in (crashes / ".workers").glob("*.json")]
        assert len([w for w in workers if w["execs"]]) == jobs
        assert all(w["final"] for w in workers)        # written by the same exit path as the counts


def test_parallel_workers_share_corpus_and_crashes(tmp_path):
    corpus, crashes = tmp_path / "corpus", tmp_path / "crashes"
    p = stepfuzz("fuzz", "--jobs", "2", "--time", "20s", "--seed", "9", "--corpus", corpus, "--crashes", crashes)
    assert p.returncode == 0, p.stderr[-2000:]
    workers = [json.loads(w.read_text()) for w in (crashes / ".workers").glob("*.json")]
    assert len(workers) >= 2 and all(w["execs"] > 0 for w in workers)
    assert len(_divergences(crashes)) > 0
    assert len(list(corpus.iterdir())) > 10


def test_bad_campaign_arguments_fail_clearly(tmp_path):
    p = stepfuzz("fuzz", "--time", "soon", "--crashes", tmp_path / "c")
    assert p.returncode == 2 and "not a duration" in p.stderr
    p = stepfuzz("fuzz", "--era", "7.7", "--crashes", tmp_path / "c")
    assert p.returncode == 2 and "unknown era" in p.stderr


def test_sigkill_of_the_supervisor_leaves_no_worker_fuzzing(tmp_path):
    """`stepfuzz fuzz --jobs 2` killed with SIGKILL: libFuzzer's parent and
    both workers notice and stop within seconds, not when --time runs out."""
    corpus, crashes = tmp_path / "corpus", tmp_path / "crashes"
    proc = subprocess.Popen([sys.executable, "-m", "stepfuzz.fuzz.cli.main", "fuzz", "--jobs", "2", "--time", "300s",
                             "--seed", "3", "--corpus", str(corpus), "--crashes", str(crashes)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = str(corpus.resolve())

    def harnesses() -> list[str]:
        out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
        return [p for p in out if int(p) != proc.pid]
    deadline = time.time() + 60
    while time.time() < deadline and len(harnesses()) < 3:
        time.sleep(0.5)
    assert len(harnesses()) >= 3, "libFuzzer's parent and two workers never started"
    proc.kill()                                  # the supervisor alone, as a SIGKILL of it would
    proc.wait()
    left = survivors(harnesses, 30)
    assert not left, f"still running after the supervisor was killed: {left}"
