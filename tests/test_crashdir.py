"""The crash directory's typed record: byte-identical round trips, every
unreadable record reported by name (never skipped in silence), and a store
that only stores."""
import json
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest

from conftest import CORPUS, REPO, stepfuzz
from stepfuzz.fuzz.findings.crashdir import (CrashDir, DivergenceRecord, UnreadableRecord, crash_dirs, read_record,
                                             scan)
from stepfuzz.fuzz.findings.store import CrashStore
from stepfuzz.fuzz.harness.confirm import Keeper
from stepfuzz.oracle.case import load_case
from stepfuzz.oracle.kvm.eras import select
from stepfuzz.oracle.run import check

KNOWN = ("known/6.1-immediate-exit-after-mmio.json", "known/4.15-stage2-fault-zero-step.json",
         "known/5.0-immediate-exit-skips-insn.json")
EXAMPLE = REPO / "crashes" / "examples" / "3ee5b726187d"


def campaign_dir(root):
    """A crash directory as a campaign leaves it: findings of a few known
    cases, and the campaign's own files beside them."""
    store = CrashStore(root, "w")
    keeper = Keeper(store)
    for f in KNOWN:
        for r in check(load_case(CORPUS / f), select("all")):
            if r.divergence:
                keeper.record(r)
    keeper.flush()
    (root / "stats.jsonl").write_text(json.dumps({"t": 1.0, "elapsed_s": 1.0, "execs": 10, "execs_per_s": 10.0,
                                                  "corpus": 3, "cov": 1, "ft": 1, "rss_mb": 1.0, "unique": 1,
                                                  "workers": 0, "by_era": {}}) + "\n")
    (root / "campaign.json").write_text("{}")
    (root / ".workers").mkdir()
    (root / ".workers" / "1.json").write_text('{"pid": 1, "final": true}')
    (root / "logs").mkdir()
    (root / "notes.txt").write_text("not a finding")
    (root / "0123456789ab").mkdir()          # a directory being created: case.json, no record yet
    (root / "0123456789ab" / "case.json").write_text("{}")
    return sorted(d.path for d in crash_dirs(root))


# ---------------------------------------------------------------- the record

def test_a_record_round_trips_byte_for_byte(tmp_path):
    paths = campaign_dir(tmp_path) + [EXAMPLE]
    assert len(paths) >= 5
    for d in paths:
        raw = (d / "divergence.json").read_text()
        rec = read_record(d / "divergence.json")
        assert rec.dumps() == raw == json.dumps(rec.to_json(), indent=2) + "\n"
        assert rec.updated({}) == rec and rec.updated({}).dumps() == raw
        assert DivergenceRecord.from_json(json.loads(raw)) == rec
    # a detail that came with a smaller case stays where the update put it: last
    data = json.loads((EXAMPLE / "divergence.json").read_text())
    data["detail"] = "exception 1 at 0x10004"
    assert list(DivergenceRecord.from_json(data).to_json()) == list(data)
    new = {k: v for k, v in data.items() if k != "detail"}
    rec = DivergenceRecord.from_json(new).updated({"detail": "x"})
    assert list(rec.to_json())[-1] == "detail" and rec.detail == "x"


def test_fields_a_later_version_wrote_survive_read_modify_write(tmp_path):
    data = json.loads((EXAMPLE / "divergence.json").read_text())
    data = {**dict(list(data.items())[:3]), "verdict": {"bucket": 7}, **dict(list(data.items())[3:]),
            "notes": ["kept"]}
    data["first_found"]["machine"] = "ci-3"
    data["got"]["hsr"] = 12
    cd = CrashDir(tmp_path / "x")
    cd.path.mkdir()
    cd.record_path.write_text(json.dumps(data, indent=2) + "\n")
    rec = cd.read_record()
    assert rec.extra == {"verdict": {"bucket": 7}, "notes": ["kept"]}
    with cd.locked():
        cd.write_record(replace(rec, count=rec.count + 5))
    back = json.loads(cd.record_path.read_text())
    assert list(back) == list(data) and back["count"] == data["count"] + 5
    assert back["verdict"] == {"bucket": 7} and back["first_found"]["machine"] == "ci-3" and back["got"]["hsr"] == 12
    assert {k: v for k, v in back.items() if k != "count"} == {k: v for k, v in data.items() if k != "count"}


def _valid() -> dict:
    return json.loads((EXAMPLE / "divergence.json").read_text())


def _without(key):
    d = _valid()
    del d[key]
    return d


CORRUPT = {        # name -> (contents, what the warning must say)
    "not-json": ('{"kind": "multi-step", ', "not valid JSON"),
    "a-list": (json.dumps([_valid()]), "not a JSON object (an array)"),
    "no-era": (json.dumps(_without("era")), 'missing field "era"'),
    "string-count": (json.dumps({**_valid(), "count": "707"}), 'field "count" is a string ("707"), not an integer'),
    "bad-date": (json.dumps({**_valid(), "first_seen": "last tuesday"}),
                 'field "first_seen" is not an ISO 8601 date: "last tuesday"'),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\xff\xfe\xc3\x28" * 8, "not valid JSON"),
}


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_each_problem_is_one_line_naming_the_file(tmp_path, name):
    text, problem = CORRUPT[name]
    p = tmp_path / "divergence.json"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(UnreadableRecord) as e:
        read_record(p)
    assert str(e.value).startswith(f"{p}: ") and problem in str(e.value) and "\n" not in str(e.value)
    assert e.value.path == p


def test_other_problems_name_the_field():
    cases = {"stop": (1.5, 'field "stop" is a number (1.5), not an integer'),
             "got": ("x", 'field "got" is a string ("x"), not an object'),
             "first_found": (None, 'field "first_found" is null, not an object'),
             "case_insns": (True, 'field "case_insns" is a boolean (true), not an integer')}
    for key, (value, problem) in cases.items():
        with pytest.raises(UnreadableRecord, match=problem.replace("(", r"\(").replace(")", r"\)")):
            DivergenceRecord.from_json({**_valid(), key: value}, "d.json")
    bad = _valid()
    bad["first_found"] = {"worker": "w", "elapsed_s": 1.0}
    with pytest.raises(UnreadableRecord, match='missing field "first_found.execs"'):
        DivergenceRecord.from_json(bad, "d.json")
    bad = _valid()
    bad["expected"]["pc"] = "0x10000"
    with pytest.raises(UnreadableRecord, match='field "expected.pc" is a string'):
        DivergenceRecord.from_json(bad, "d.json")
    assert DivergenceRecord.from_json({**_valid(), "got": None}).got is None


def test_unreadable_files_are_named(tmp_path):
    d = tmp_path / "divergence.json"
    d.mkdir()
    with pytest.raises(UnreadableRecord, match="unreadable"):
        read_record(d)
    with pytest.raises(UnreadableRecord, match="unreadable"):
        read_record(tmp_path / "missing.json")


# ---------------------------------------------------------------- readers report, never skip

@pytest.fixture
def corrupted(tmp_path):
    """A campaign's crash directory with one finding per kind of corrupt record."""
    root = tmp_path / "crashes"
    good = campaign_dir(root)
    bad = {}
    for i, (name, (text, problem)) in enumerate(sorted(CORRUPT.items())):
        d = root / f"bad{i:02d}-{name}"
        shutil.copytree(good[0], d)
        (d / "divergence.json").write_bytes(text if isinstance(text, bytes) else text.encode())
        bad[d] = problem
    sigs = {read_record(d / "divergence.json").signature for d in good}
    return root, good, bad, sigs


def _warnings(stderr: str) -> list[str]:
    lines = stderr.splitlines()
    assert all(l.startswith("stepfuzz: warning: ") for l in lines), stderr
    return [l[len("stepfuzz: warning: "):] for l in lines]


def _each_named_once(stderr, bad, prefix=""):
    warnings = _warnings(stderr)
    assert len(warnings) == len(bad), warnings
    for d, problem in bad.items():
        (line,) = [w for w in warnings if w.startswith(f"{d / 'divergence.json'}: ")]
        assert problem in line, line


def test_scan_collects_every_unreadable_record(corrupted):
    root, good, bad, _ = corrupted
    s = scan(root)
    assert [f.dir.path for f in s] == good
    assert sorted(e.path for e in s.unreadable) == sorted(d / "divergence.json" for d in bad)


def test_status_names_each_unreadable_record_and_shows_the_rest(corrupted):
    root, good, bad, sigs = corrupted
    p = stepfuzz("status", root)
    assert p.returncode == 0, p.stderr
    _each_named_once(p.stderr, bad)
    assert f"{len(good)} crash directories" in p.stdout
    for d in good:
        assert read_record(d / "divergence.json").root_signature in p.stdout
    assert not any(d.name in p.stdout for d in bad)


def test_triage_names_each_unreadable_record_and_shows_the_rest(corrupted):
    root, good, bad, sigs = corrupted
    p = stepfuzz("triage", root)
    assert p.returncode == 0, p.stderr
    _each_named_once(p.stderr, bad)
    assert f"root causes (0 new-bug candidates), {len(good)} crash directories" in p.stdout
    for s in sigs:
        assert f"`{s}`" in p.stdout


def test_crashes_merge_names_each_unreadable_record_and_merges_the_rest(corrupted, tmp_path):
    root, good, bad, sigs = corrupted
    out = tmp_path / "merged"
    p = stepfuzz("crashes", "merge", root, "-o", out)
    assert p.returncode == 0, p.stderr
    _each_named_once(p.stderr, bad)
    merged = [read_record(d / "divergence.json") for d in out.iterdir()]
    assert f"{len(merged)} root causes" in p.stdout
    assert {s for r in merged for s in r.signatures} == \
        {s for d in good for s in read_record(d / "divergence.json").signatures}       # every signature, under its root
    total = sum(read_record(d / "divergence.json").count for d in good)
    assert sum(r.count for r in merged) == total                              # every hit
    # merged again: the output's records are read too, and nothing is counted twice
    p = stepfuzz("crashes", "merge", root, "-o", out)
    assert p.returncode == 0 and f"({len(good)} findings merged into one found elsewhere)" in p.stdout
    assert sum(read_record(d / "divergence.json").count for d in out.iterdir()) == total
    # a corrupt record in the output is named, and replaced by the source's
    victim = sorted(out.glob("*/divergence.json"))[0]
    before = read_record(victim)
    victim.write_text("[]")
    p = stepfuzz("crashes", "merge", root, "-o", out)
    assert p.returncode == 0
    assert f"stepfuzz: warning: {victim}: not a JSON object (an array) (replaced by " in p.stderr
    assert read_record(victim).count == before.count and read_record(victim).root_cause == before.root_cause


def test_minimize_names_an_unreadable_record(corrupted):
    root, good, bad, _ = corrupted
    one = next(iter(bad))
    p = stepfuzz("minimize", one)
    assert p.returncode == 2
    assert p.stderr.startswith(f"stepfuzz: error: {one / 'divergence.json'}: ") and bad[one] in p.stderr
    assert len(p.stderr.splitlines()) == 1
    for d in good[1:]:
        shutil.rmtree(d)                 # keep it short: one finding left to minimize
    p = stepfuzz("minimize", root)
    assert p.returncode == 2
    _each_named_once(p.stderr, bad)
    assert (good[0] / "minimized.json").exists() and good[0].name in p.stdout


def test_plot_of_a_directory_without_stats_is_a_one_line_error(tmp_path):
    p = stepfuzz("plot", tmp_path)
    assert p.returncode == 2 and p.stderr.strip() == f"stepfuzz: error: {tmp_path}: no stats.jsonl (not a campaign's crash directory?)"


# ---------------------------------------------------------------- the store only stores

def test_the_store_never_imports_the_oracle_front_door():
    code = ("import sys\n"
            "import stepfuzz.fuzz.findings.store, stepfuzz.fuzz.findings.crashdir\n"
            "print('stepfuzz.oracle.run' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"], out.stdout + out.stderr
    import stepfuzz.fuzz.findings.store as store
    assert not hasattr(store, "check") and not hasattr(store, "UnstableDivergence")


def test_the_harness_confirms_and_the_store_keeps_what_it_is_given(tmp_path):
    """A campaign's result (first divergence only) goes through the harness's
    Keeper: the directory it leaves is the one the store writes for the
    whole result."""
    from stepfuzz.fuzz.harness.confirm import Keeper
    case = load_case(CORPUS / KNOWN[0])
    (partial,) = check(case, select("6.1"), first_divergence_only=True)
    (whole,) = check(case, select("6.1"))
    assert partial.model.stops != whole.model.stops              # the campaign's trace stops early
    assert Keeper(CrashStore(tmp_path / "a")).record(partial) == "v6.14:2ca3f03bf524/multi-step"
    assert Keeper(CrashStore(tmp_path / "b")).record(whole) == "v6.14:2ca3f03bf524/multi-step"
    (a,), (b,) = crash_dirs(tmp_path / "a"), crash_dirs(tmp_path / "b")
    for name in (CrashDir.CASE, CrashDir.REPORT):
        assert (a.path / name).read_bytes() == (b.path / name).read_bytes()
    ra, rb = a.read_record(), b.read_record()
    assert replace(ra, first_seen="", last_seen="", first_found=rb.first_found) == \
        replace(rb, first_seen="", last_seen="")


def test_the_examples_replay_to_their_root_cause_old_format_and_new():
    """Both shipped examples are one bug: the new directory says so in its
    record, the old one (one per-era signature) is attributed on read."""
    from stepfuzz.fuzz.findings.rootcause import root_of
    from stepfuzz.oracle.kvm.attribute import attribute, root_cause
    new = CrashDir(REPO / "crashes" / "examples" / "508c4da3f2ff")
    old = CrashDir(EXAMPLE)
    assert new.read_record().root_signature == "v6.14:2ca3f03bf524/multi-step"
    assert old.read_record().root_cause is None
    assert root_of(old, old.read_record())["signature"] == new.read_record().root_signature
    for cd in (new, old):
        rec = cd.read_record()
        for path in (cd.case, cd.minimized):
            (r,) = check(load_case(path), select(rec.era))
            assert root_cause(attribute(r.case, r.era, r.divergence), r.divergence).signature == \
                "v6.14:2ca3f03bf524/multi-step"
    p = stepfuzz("triage", REPO / "crashes" / "examples", "--json")
    (row,) = map(json.loads, p.stdout.splitlines())
    assert row["signature"] == "v6.14:2ca3f03bf524/multi-step" and len(row["dirs"]) == 2
    assert row["fixed_by"] == ["2ca3f03bf524"] and row["eras"] == ["6.1"] and not row["new_bug_candidate"]
