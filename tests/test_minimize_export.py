"""Minimize, triage and export, as a user runs them; reproducers proven on real kernels."""
import json
import re
import shutil
import subprocess
import tomllib
from dataclasses import replace
from fnmatch import fnmatch
from importlib import resources

import pytest

from conftest import CORPUS, REPO, padded_6_1_case, stepfuzz
from stepfuzz.fuzz.findings.store import CrashStore
from stepfuzz.fuzz.harness.confirm import Keeper
from stepfuzz.fuzz.findings import export
from stepfuzz.fuzz.findings.export import c_comment, c_string, selftest, standalone
from stepfuzz.fuzz.findings.minimize import minimize
from stepfuzz.oracle.case import load_case
from stepfuzz.oracle.kvm.eras import ERAS, select
from stepfuzz.oracle.run import check


def test_a_40_instruction_divergence_shrinks_to_its_cause():
    case = padded_6_1_case()
    (r,) = check(case, select("6.1"))
    assert r.divergence.signature == "6.1/multi-step/immediate-exit+mmio"
    small, m = minimize(case, ERAS["6.1"])
    assert len(small.words) <= 4 and len(small.events) == 1
    (again,) = check(small, select("6.1"))
    assert again.divergence.signature == r.divergence.signature
    assert minimize(case, ERAS["6.1"])[0] == small            # deterministic


def test_minimize_command_on_a_case_and_on_a_crash_directory(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(padded_6_1_case().dumps())
    p = stepfuzz("minimize", path, "--era", "6.1", "-o", tmp_path / "small.json")
    assert p.returncode == 0, p.stderr
    assert "40 instructions" in p.stdout and "-> " in p.stdout
    small = load_case(tmp_path / "small.json")
    assert len(small.words) <= 4 and small.asm                  # readable assembly
    p = stepfuzz("minimize", CORPUS / "programs" / "loop.json", "--era", "6.1")
    assert p.returncode == 2 and "does not diverge on era 6.1" in p.stderr
    crashes = tmp_path / "crashes"
    store = CrashStore(crashes)
    keeper = Keeper(store)
    for f in ("known/4.15-stage2-fault-zero-step.json", "known/4.14-emulated-sysreg-multi-step.json"):
        for r in check(load_case(CORPUS / f), select("all")):
            if r.divergence:
                keeper.record(r)
    keeper.flush()
    one = sorted(crashes.glob("*/divergence.json"))[0].parent
    p = stepfuzz("minimize", one)                                 # one crash directory
    assert p.returncode == 0, p.stderr
    assert [m.parent for m in crashes.glob("*/minimized.json")] == [one]
    p = stepfuzz("minimize", crashes)                             # all of them
    assert p.returncode == 0, p.stderr
    assert len(list(crashes.glob("*/minimized.json"))) == len(list(crashes.glob("*/divergence.json")))
    p = stepfuzz("minimize", tmp_path)
    assert p.returncode == 2 and "neither a crash directory nor a directory of them" in p.stderr


def test_triage_groups_signatures_by_root_cause(tmp_path):
    crashes = tmp_path / "crashes"
    store = CrashStore(crashes)
    keeper = Keeper(store)
    for f in CORPUS.rglob("*.json"):
        for r in check(load_case(f), select("all")):
            if r.divergence:
                keeper.record(r)
    keeper.flush()
    n_sigs = len({s for f in crashes.glob("*/divergence.json") for s in json.loads(f.read_text())["signatures"]})
    p = stepfuzz("triage", crashes, "--html", tmp_path / "t.html")
    assert p.returncode == 0
    rows = [l for l in p.stdout.splitlines() if l.startswith("| ") and not l.startswith("| what a VMM sees")]
    assert 0 < len(rows) < n_sigs
    assert any(r.startswith("| a stop with no instruction stepped | kvm_arm_handle_step_debug(): whether a trap")
               and "bd7d95cafb49 (v5.0)" in r and "| 4.15 |" in r for r in rows)
    assert any(r.startswith("| two or more instructions in one step |") and "cdb5e02ed133 (v5.11)" in r
               and "5.0, 5.10 |" in r for r in rows)
    assert "<table>" in (tmp_path / "t.html").read_text()


def test_exported_c_escapes_case_text(tmp_path):
    evil = '*/ #include "x" \\ ??= \n\t\x01 /*'
    assert not any(bad in c_comment(evil) for bad in ("*/", "/*", "??", "\n", "\x01"))
    lit = c_string(evil)
    assert lit.startswith('"') and lit.endswith('"') and "\n" not in lit and "??=" not in lit
    base = load_case(CORPUS / "known" / "6.1-immediate-exit-after-mmio.json")
    case = replace(base, name=evil)
    import re

    def code_only(text):      # string literals and comments are data; the rest must not change
        text = re.sub(r'"(\\.|[^"\\])*"', '""', text)
        return re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    for exporter in (standalone, selftest):
        assert code_only(exporter([case])) == code_only(exporter([replace(base, name="plain")]))
    if shutil.which("aarch64-linux-gnu-gcc"):
        src = tmp_path / "evil.c"
        src.write_text(standalone([case]))
        cc = subprocess.run(["aarch64-linux-gnu-gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o",
                             str(tmp_path / "evil"), str(src)], capture_output=True, text=True)
        assert cc.returncode == 0, cc.stderr


KNOWN = sorted((CORPUS / "known").glob("*.json"))


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="needs gcc-aarch64-linux-gnu")
def test_exports_compile_without_warnings(tmp_path):
    for f in KNOWN:
        p = stepfuzz("export", f, "--standalone", "-o", tmp_path / f"{f.stem}.c")
        assert p.returncode == 0, p.stderr
        cc = subprocess.run(["aarch64-linux-gnu-gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror",
                             "-o", str(tmp_path / f.stem), str(tmp_path / f"{f.stem}.c")], capture_output=True, text=True)
        assert cc.returncode == 0, cc.stderr
    p = stepfuzz("export-corpus", CORPUS / "known", "-o", tmp_path / "out")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "out" / "stepfuzz_single_step.c").read_text().count(".name =") == len(KNOWN)
    cc = subprocess.run(["aarch64-linux-gnu-gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o",
                         str(tmp_path / "all"), str(tmp_path / "out" / "stepfuzz_repro.c")], capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr


def test_export_refuses_what_it_cannot_check(tmp_path):
    bad = tmp_path / "wfi.json"
    bad.write_text(json.dumps({"stepfuzz": 1, "code": {"base": "0x10000", "asm": "nop\nwfi"},
                               "memory": [{"base": "0x10000", "size": "0x10000", "kind": "ram"}]}))
    p = stepfuzz("export", bad, "--standalone", "-o", tmp_path / "x.c")
    assert p.returncode == 2 and "cannot check" in p.stderr and not (tmp_path / "x.c").exists()
    p = stepfuzz("export", CORPUS / "known" / "5.11-irq-after-retire-multi-step.json", "--standalone", "-o", tmp_path / "y.c")
    assert p.returncode == 0 and "not reproducible from userspace, left out: after insn 2: host-irq" in p.stderr


# ---------------------------------------------------------------- templates and the shared header

TEMPLATES = ("case_table.c", "standalone.c", "selftest.c")
HEADER = "stepfuzz_vmm.h"
LEFTOVER = re.compile(r"@[A-Z][A-Z_]*@")          # a template hole, filled or not


def package_data() -> list[tuple[str, str]]:
    return [("stepfuzz.fuzz.findings", f"templates/{t}") for t in TEMPLATES] + \
        [("stepfuzz.oracle.realkvm", name) for name in ("vmm.c", "runner.c", HEADER)]


def test_templates_and_the_shared_header_are_package_data():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for package, name in package_data():
        assert (resources.files(package) / name).is_file(), (package, name)
        # what a wheel ships: the package-data globs must match it
        assert any(fnmatch(name, pattern) for pattern in declared.get(package, ())), (package, name)
    for t in TEMPLATES:
        text = export.template(t)
        holes = LEFTOVER.findall(text)
        assert holes and len(holes) == len(export.HOLE_LINE.findall(text)), f"{t}: a hole not on a line of its own"


def header_names() -> tuple[set[str], dict[str, str]]:
    """The macros and enum members stepfuzz_vmm.h defines, and the ENDED_* strings."""
    text = (resources.files("stepfuzz.oracle.realkvm") / HEADER).read_text()
    macros = set(re.findall(r"^#define (\w+)", text, re.M)) - {"STEPFUZZ_VMM_H"}
    members = {m for body in re.findall(r"enum \{([^}]*)\}", text) for m in re.findall(r"\b([A-Z]\w*)\b", body)}
    return macros | members, dict(re.findall(r'^#define (ENDED_\w+) "([^"]*)"', text, re.M))


def test_shared_constants_are_defined_only_in_the_header():
    names, ended = header_names()
    assert {"MAX_REGIONS", "MAX_EVENTS", "INSN_B_SELF", "R_RAM", "EV_MMIO", "DO_SIGNAL", "ENDED_END"} <= names
    others = {name: (resources.files(pkg) / name).read_text() for pkg, name in package_data() if name != HEADER}
    for where, text in others.items():
        for name in names:
            assert not re.search(rf"#define {name}\b|enum \{{[^}}]*\b{name}\b", text), f"{where} defines {name} again"
    assert '#include "stepfuzz_vmm.h"' in others["vmm.c"]
    # what the exporter writes into the case tables is the header's
    text = standalone([load_case(f) for f in KNOWN]) + selftest([load_case(f) for f in KNOWN])
    table_names = set(re.findall(r"\b(?:R|EV|DO)_[A-Z]+\b", text))
    assert table_names and table_names <= names
    assert set(export.EXPORTABLE_ENDINGS.values()) <= set(ended.values())


def test_exported_c_is_one_file_with_no_hole_left(tmp_path):
    cases = [load_case(f) for f in KNOWN]
    for text in [standalone([c]) for c in cases] + [selftest([c]) for c in cases] + [standalone(cases), selftest(cases)]:
        assert not LEFTOVER.search(text), LEFTOVER.search(text).group()
        assert "#define STEPFUZZ_VMM_H" in text and '"stepfuzz_vmm.h"' not in text     # inlined, not included
    assert not re.search(r'#include\s*"', standalone(cases))                          # libc and <linux/kvm.h> only
    p = stepfuzz("export-corpus", CORPUS / "known", "-o", tmp_path)
    assert p.returncode == 0, p.stderr
    for f in tmp_path.glob("*.c"):
        assert not LEFTOVER.search(f.read_text()), f


def test_case_text_that_looks_like_a_hole_stays_text():
    base = load_case(CORPUS / "known" / "6.1-immediate-exit-after-mmio.json")
    for name in ("/* @CASES@ */", " * @VMM@", "@LIST@", "@CASE_TABLE@ * @STEPFUZZ_VMM_H@"):
        for export_c in (standalone, selftest):
            text = export_c([replace(base, name=name)])
            assert text.count("#define STEPFUZZ_VMM_H") == 1 and text.count("static const struct sf_case cases[]") == 1
