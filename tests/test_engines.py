"""Beyond one machine: the harness packed as ClusterFuzzLite packs it, and merging."""
import json
import re
import shutil
import subprocess

import pytest

from conftest import CORPUS, REPO, stepfuzz
from stepfuzz.fuzz.harness import features
from stepfuzz.fuzz.inputs.encoding import NotACase, decode_input
from stepfuzz.oracle.case import load_case
from stepfuzz.oracle.kvm.eras import select
from stepfuzz.oracle.run import check

HARNESS = REPO / "fuzz" / "harness" / "stepfuzz_fuzzer.py"
COLLECT = ["--collect-all", "unicorn", "--collect-all", "capstone", "--collect-all", "keystone",
           "--collect-all", "atheris"]


@pytest.fixture(scope="session")
def packed(tmp_path_factory):
    """Build the harness the way compile_python_fuzzer does: a PyInstaller
    one-file package in $OUT plus a wrapper script named after the fuzzer."""
    if shutil.which("pyinstaller") is None:
        pytest.skip("pyinstaller is not installed (pip install -e '.[test]')")
    out = tmp_path_factory.mktemp("out")
    work = tmp_path_factory.mktemp("work")
    p = subprocess.run(["pyinstaller", "--distpath", str(out), "--workpath", str(work), "--specpath", str(work),
                        "--onefile", "--name", "stepfuzz_fuzzer.pkg", *COLLECT, str(HARNESS)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    wrapper = out / "stepfuzz_fuzzer"
    wrapper.write_text('#!/bin/sh\n# LLVMFuzzerTestOneInput for fuzzer detection.\n'
                       'this_dir=$(dirname "$0")\nexec "$this_dir/stepfuzz_fuzzer.pkg" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def test_clusterfuzzlite_layout():
    cfl = REPO / ".clusterfuzzlite"
    assert (cfl / "project.yaml").read_text().strip() == "language: python"
    assert "base-builder-python" in (cfl / "Dockerfile").read_text()
    build = (cfl / "build.sh").read_text()
    assert "compile_python_fuzzer" in build and "*_fuzzer.py" in build and "pip3 install ." in build
    for flag in COLLECT[1::2]:
        assert f"--collect-all {flag}" in build
    workflows = {p.name: p.read_text() for p in (REPO / ".github" / "workflows").glob("cflite_*.yml")}
    modes = {m for text in workflows.values() for m in re.findall(r"mode: (\S+)", text)}
    assert modes == {"code-change", "batch", "prune", "coverage"}
    assert all("language: python" in t for t in workflows.values())


def test_packed_fuzzer_uses_the_corpus_and_leaves_a_divergence_artifact(packed, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(CORPUS / "known" / "6.1-immediate-exit-after-mmio.json", corpus)
    env = {"PATH": "/usr/bin:/bin", "STEPFUZZ_ERAS": "6.1", "HOME": str(tmp_path)}
    p = subprocess.run([str(packed), str(corpus), "-runs=200", f"-artifact_prefix={tmp_path}/"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    output = p.stdout + p.stderr
    assert "1 files found" in output, output[-2000:]
    assert p.returncode != 0 and "DivergenceFound: v6.14:2ca3f03bf524/multi-step" in output    # the root cause
    assert "diverges_v6_14_2ca3f03bf524_multi_step" in output      # the engine's dedup key
    (artifact,) = tmp_path.glob("crash-*")
    assert json.loads(artifact.read_text())["code"]["asm"].startswith("nop")


def test_packed_fuzzer_defaults_to_current_kernels_and_keeps_going(packed, tmp_path):
    corpus = tmp_path / "corpus"
    # the shipped seeds only: a campaign run in this checkout adds its own inputs to corpus/
    shutil.copytree(CORPUS, corpus, ignore=shutil.ignore_patterns("[0-9a-f]" * 40))
    # ... but the seed of the one divergence predicted on current kernels
    (corpus / "conversation" / "hvc-forwarded-continue-then-step.json").unlink()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    p = subprocess.run([str(packed), str(corpus), "-runs=300", "-seed=3", f"-artifact_prefix={tmp_path}/"],
                       capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    # 7.2 and arch agree with the ideal stepper on everything else: no finding
    # (libFuzzer counts the seeds it loads among its runs)
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(r"Done \d{3} runs", p.stderr) and not list(tmp_path.glob("crash-*"))


def test_corpus_merge_loses_no_signature_and_no_feature(tmp_path):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    for d, seed in ((a, 1), (b, 2)):
        p = stepfuzz("fuzz", "--runs", "300", "--seed", seed, "--corpus", d, "--crashes", tmp_path / f"c{seed}")
        assert p.returncode == 0, p.stderr[-2000:]
    p = stepfuzz("corpus", "merge", a, b, "-o", out)
    assert p.returncode == 0, p.stderr
    eras = select("all")

    def seen(d):
        """Every era's divergence signatures over whole traces (not the
        merge's own first-divergence check), and the behaviour buckets the
        harness walks (libFuzzer's view of them: distinct behaviours may
        share a bucket)."""
        sigs, buckets = set(), set()
        for f in d.iterdir():
            try:
                case = decode_input(f.read_bytes()).bounded(100)
            except NotACase:
                continue
            sigs |= {r.divergence.signature for r in check(case, eras) if r.divergence}
            buckets |= {features.bucket(h) for h in features.behaviours(check(case, eras, first_divergence_only=True))}
        return sigs, buckets

    (sa, ba), (sb, bb), (so, bo) = seen(a), seen(b), seen(out)
    assert sa | sb <= so
    assert ba | bb <= bo
    assert len(list(out.iterdir())) <= len(list(a.iterdir())) + len(list(b.iterdir()))
    assert not (out / ".merge_control").exists()


def test_crashes_merge_keeps_every_signature_once(tmp_path):
    dirs = []
    for seed in (1, 2):
        c = tmp_path / f"c{seed}"
        assert stepfuzz("fuzz", "--runs", "200", "--seed", seed, "--corpus", tmp_path / f"k{seed}",
                        "--crashes", c).returncode == 0
        dirs.append(c)
    p = stepfuzz("crashes", "merge", *dirs, "-o", tmp_path / "all")
    assert p.returncode == 0, p.stderr
    def roots(d):
        return {(info := json.loads(f.read_text()))["root_cause"]["signature"]: info for f in d.glob("*/divergence.json")}
    merged = roots(tmp_path / "all")
    assert set(merged) == set(roots(dirs[0])) | set(roots(dirs[1]))
    for s in merged:                                 # two campaigns' hits add up, every signature is kept
        parts = [roots(d)[s] for d in dirs if s in roots(d)]
        assert merged[s]["count"] == sum(p["count"] for p in parts)
        assert set(merged[s]["signatures"]) == {k for p in parts for k in p["signatures"]}
    p = stepfuzz("crashes", "merge", *dirs, "-o", tmp_path / "all")          # again: nothing counted twice
    assert {s: r["count"] for s, r in roots(tmp_path / "all").items()} == {s: r["count"] for s, r in merged.items()}
    for d in (tmp_path / "all").iterdir():          # each record describes the case kept beside it
        if (d / "divergence.json").exists():
            info = json.loads((d / "divergence.json").read_text())
            (r,) = check(load_case(d / "case.json"), select(info["era"]))
            assert {k: info[k] for k in ("signature", "stop", "expected", "got")} == \
                   {k: r.divergence.to_json()[k] for k in ("signature", "stop", "expected", "got")}
