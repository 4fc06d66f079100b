"""Exported standalone reproducers, proven on real kernels with `stepfuzz kvm exec`.

For each shipped known-divergence case: the reproducer exits 1 on a real
kernel whose era shows the divergence (as the case's `expect` says) and 0 on
the newest kernel.  Cases whose divergence needs an event a VMM cannot time
(a host interrupt, a signal during exit handling) lose that event in export;
their reproducers check the ideal stops and pass everywhere.
"""
import subprocess
import sys

import pytest

from conftest import CORPUS, REPO
from oracle.case import load_case
from oracle.realkvm import kernels as K

KNOWN = sorted((CORPUS / "known").glob("*.json"))
TIMED = ("before", "after", "trap")
KERNELS = ("5.10", "6.1", "latest")


def stepfuzz(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "fuzz.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="session")
def reproducers(tools, tmp_path_factory):
    out = tmp_path_factory.mktemp("repro")
    built = {}
    for f in KNOWN:
        src = out / f"{f.stem}.c"
        assert stepfuzz("export", f, "--standalone", "-o", src).returncode == 0
        subprocess.run(["aarch64-linux-gnu-gcc", "-static", "-O2", "-Wall", "-Werror", "-o", str(out / f.stem), str(src)],
                       check=True)
        built[f.stem] = out / f.stem
    return built


def expected_exit(case_path, kernel_name, kernel) -> int:
    case = load_case(case_path)
    if any(e.when in TIMED for e in case.events):
        return 0
    era = K.era_for_version(kernel.version)
    return 0 if dict(case.expect)[era] == "agree" else 1


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("case", KNOWN, ids=lambda p: p.stem)
def test_reproducer_fails_where_the_bug_is_and_passes_where_fixed(reproducers, kernel, name, case):
    k = kernel(name)
    want = expected_exit(case, name, k)
    if name != "latest" and want == 0:
        pytest.skip(f"{K.era_for_version(k.version)} does not show this divergence: checked on latest")
    p = stepfuzz("kvm", "exec", reproducers[case.stem], "--kernel", name, timeout=300)
    assert p.returncode == want, p.stdout[-3000:] + p.stderr[-2000:]
    assert ("DIVERGES" in p.stdout) == (want == 1)


def test_triage_says_which_real_kernels_show_each_root_cause(tools, kernel, tmp_path):
    from fuzz.crashes import CrashStore
    from oracle.kvm.eras import select
    from oracle.run import check
    kernel("6.1")
    store = CrashStore(tmp_path / "crashes")
    for f in KNOWN:
        for r in check(load_case(f), select("all")):
            if r.divergence:
                store.record(r)
    store.flush()
    assert stepfuzz("minimize", tmp_path / "crashes").returncode == 0
    p = stepfuzz("triage", tmp_path / "crashes", "--kernels", "6.1")
    assert p.returncode == 0, p.stderr
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in p.stdout.splitlines()
            if line.startswith("| ") and "effect" not in line}
    assert "6.1: shows it" in rows[("2+ instructions per stop", "immediate-exit+mmio")]
    assert "6.1: ideal" in rows[("2+ instructions per stop", "dbgreg")]
    assert "6.1: not reproducible here" in rows[("2+ instructions per stop", "irq-pending")]
