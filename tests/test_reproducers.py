"""Exported standalone reproducers, proven on real kernels with `stepfuzz kvm exec`.

For each shipped known-divergence case and each real kernel: the reproducer
exits 1 where the kernel's era model diverges on the case as exported and 0
where it does not, the newest kernel included.  Events a VMM cannot time (a
host interrupt, a signal during exit handling) are left out of an export, so
a case that needs one to diverge passes everywhere -- unless what remains
still diverges on that era (the 5.13 signal-after-sysreg case on 5.10, where
the emulated sysreg alone takes two steps).
"""
import json
import subprocess

import pytest

from conftest import CORPUS, stepfuzz
from stepfuzz.fuzz.findings.export import as_reproduced
from stepfuzz.oracle.case import load_case
from stepfuzz.oracle.kvm.eras import ERAS
from stepfuzz.oracle.run import check
from stepfuzz.oracle.realkvm import kernels as K

KNOWN = sorted((CORPUS / "known").glob("*.json"))
KERNELS = ("5.10", "6.1", "latest")


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


def expected_exit(case_path, kernel) -> int:
    """What the kernel's era model says about the case as exported (events a
    VMM cannot time left out); for the others, what the case's `expect` says."""
    case = load_case(case_path)
    era = K.era_for_version(kernel.version)
    diverges = check(as_reproduced(case), [ERAS[era]])[0].divergence is not None
    if case == as_reproduced(case):
        assert diverges == (dict(case.expect)[era] != "agree")
    return 1 if diverges else 0


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("case", KNOWN, ids=lambda p: p.stem)
def test_reproducer_fails_where_the_bug_is_and_passes_where_fixed(reproducers, kernel, name, case):
    k = kernel(name)
    want = expected_exit(case, k)
    p = stepfuzz("kvm", "exec", reproducers[case.stem], "--kernel", name, timeout=300)
    assert p.returncode == want, p.stdout[-3000:] + p.stderr[-2000:]
    assert ("DIVERGES" in p.stdout) == (want == 1)


def test_triage_says_which_real_kernels_show_each_root_cause(tools, kernel, tmp_path):
    from stepfuzz.fuzz.findings.store import CrashStore
    from stepfuzz.fuzz.harness.confirm import Keeper
    from stepfuzz.oracle.kvm.eras import select
    from stepfuzz.oracle.run import check
    kernel("6.1")
    store = CrashStore(tmp_path / "crashes")
    keeper = Keeper(store)
    for f in KNOWN:
        for r in check(load_case(f), select("all")):
            if r.divergence:
                keeper.record(r)
    keeper.flush()
    assert stepfuzz("minimize", tmp_path / "crashes").returncode == 0
    p = stepfuzz("triage", tmp_path / "crashes", "--kernels", "6.1", "--json")
    assert p.returncode == 0, p.stderr
    rows = {r["signature"]: r for r in map(json.loads, p.stdout.splitlines())}
    assert rows["v6.14:2ca3f03bf524/multi-step"]["real"] == {"6.1": "shows it"}      # fixed after 6.1
    assert rows["v5.11:cdb5e02ed133/multi-step"]["real"] == {"6.1": "ideal"}         # fixed before it
    # fixed in 6.1 itself: never shown there (its smallest reproducer may need a
    # host interrupt timed after an instruction, which no VMM can reproduce)
    assert rows["v6.1:34fbdee086cf+370531d1e95b/multi-step"]["real"]["6.1"] in ("ideal", "not reproducible here")
