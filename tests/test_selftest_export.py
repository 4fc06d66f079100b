"""The exported KVM selftest, built against the real selftest library and run on real kernels.

`stepfuzz export --selftest` writes a test for tools/testing/selftests/kvm/arm64/.
Here it is built the way upstream builds its own tests, in a kernel tree from
Debian's linux-source package, and the static binary runs under
`stepfuzz kvm exec`.  Two trees, because a selftest library only runs on
kernels at least as new as the ones it was written for (from 6.8 on it needs
KVM_SET_USER_MEMORY_REGION2 and skips on 6.1):

- `latest`: the newest linux-source-X.Y in trixie-backports (arm64/ layout,
  6.14+); its binaries run on the `latest` kernel.
- `6.1`: linux-source-6.1 from bookworm (aarch64/ layout); its binaries run
  on 6.1 (and on latest).

The recipe, per tree, cached in <cache>/selftests/<version>/ (selftest.json
marks a finished one; a second run touches no network; delete the directory
to pick up a newer source package):

1. `apt-get download linux-source-X.Y` with the private arm64 lists of
   oracle/realkvm/kernels.py (the archive comes from the machine's apt sources).
2. `dpkg-deb --fsys-tarfile DEB | tar -xO ./usr/src/linux-source-X.Y.tar.xz |
   xz -dc | tar -x` of only Makefile, scripts/, include/uapi/, usr/,
   arch/arm64/{Makefile,include/uapi,tools,kernel/Makefile*} and tools/ (not
   tools/perf/); the .deb is not kept.
3. `make ARCH=arm64 headers` (host gcc builds fixdep and unifdef) -> usr/include.
4. Per test: the exported file goes to tools/testing/selftests/kvm/<layout>/NAME.c and
   `make -C tools/testing/selftests/kvm ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu-
   OUTPUT=<cache>/selftests/<version>/build TEST_GEN_PROGS_<layout>=<layout>/NAME
   EXTRA_CFLAGS=-static <OUTPUT>/<layout>/NAME` builds the library objects (once)
   and links the test with the selftests' own CFLAGS (-Wall ...).

Without the source (no apt, no mirror) or a tool, the tests skip, unless
STEPFUZZ_REQUIRE_KVM is set (CI), where they fail.
"""
import fcntl
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import CORPUS, make, stepfuzz, unavailable
from stepfuzz.fuzz.findings.export import as_reproduced, selftest
from stepfuzz.oracle.case import load_case, parse_case
from stepfuzz.oracle.kvm.eras import ERAS
from stepfuzz.oracle.run import check
from stepfuzz.oracle.realkvm import RealKvmError, cache_root, kernels

CASE = CORPUS / "known" / "6.1-immediate-exit-after-mmio.json"
TEST_ASSERT_EXIT = 254                          # the library's exit status after a TEST_ASSERT failure
KSFT_FAIL = 1                                   # ksft_finished() when a test of the plan failed
JOBS = str(os.cpu_count() or 2)
BUILD_TOOLS = (("make", "make"), ("gcc", "gcc"), ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
               ("dpkg-deb", "dpkg"), ("tar", "tar"), ("xz", "xz-utils"))
# What the kernel's `make headers` and the KVM selftests read (relative to the tree's top directory).
KEEP = ("Makefile", "scripts", "include/uapi", "usr", "tools", "arch/arm64/Makefile",
        "arch/arm64/include/uapi", "arch/arm64/tools", "arch/arm64/kernel/Makefile*")


@dataclass(frozen=True)
class Tree:
    """A kernel release whose source package holds the selftest library."""
    name: str               # also the kernel it is run on
    release: str            # oracle.realkvm.kernels.RELEASES key: the suites to look in
    package: str            # regex over linux-source-* names; groups = version numbers


TREES = {t.name: t for t in (
    Tree("latest", "latest", r"linux-source-(\d+)\.(\d+)"),
    Tree("6.1", "6.1", r"linux-source-(6)\.(1)"),
)}


def clean_env() -> dict[str, str]:
    """No make or compiler settings from the caller's environment leak into the build."""
    drop = ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "ARCH", "CROSS_COMPILE", "CC", "CFLAGS", "LDFLAGS",
            "LLVM", "O", "KBUILD_OUTPUT", "OUTPUT", "EXTRA_CFLAGS", "KHDR_INCLUDES")
    return {k: v for k, v in os.environ.items() if k not in drop}


# ---------------------------------------------------------------- per-case results, with a fake library

# Just enough of kvm_util.h, processor.h, test_util.h and kselftest for the
# exported test to build and run on the host: a "vCPU" whose every step
# moves the PC 4 bytes on, as if each instruction were a nop, and TAP output.
FAKE_HEADERS = {
    "test_util.h": r"""
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
void ksft_print_header(void);
void ksft_set_plan(unsigned int n);
void ksft_print_msg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void fake_result(bool ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define ksft_test_result(cond, ...) fake_result(!!(cond), __VA_ARGS__)
void ksft_finished(void) __attribute__((noreturn));
""",
    "kvm_util.h": r"""
#include <linux/kvm.h>
#include "test_util.h"
struct kvm_vm { unsigned int page_size; };
struct kvm_vcpu { struct kvm_run *run; uint64_t pc; };
enum vm_mem_backing_src_type { VM_MEM_SRC_ANONYMOUS };
struct kvm_vm *vm_create_with_one_vcpu(struct kvm_vcpu **vcpu, void *guest_code);
void vm_userspace_mem_region_add(struct kvm_vm *vm, enum vm_mem_backing_src_type src, uint64_t gpa,
                                 uint32_t slot, uint64_t npages, uint32_t flags);
void virt_map(struct kvm_vm *vm, uint64_t vaddr, uint64_t paddr, unsigned int npages);
void *addr_gpa2hva(struct kvm_vm *vm, uint64_t gpa);
void vcpu_set_reg(struct kvm_vcpu *vcpu, uint64_t id, uint64_t val);
int __vcpu_get_reg(struct kvm_vcpu *vcpu, uint64_t id, void *val);
void vcpu_guest_debug_set(struct kvm_vcpu *vcpu, struct kvm_guest_debug *debug);
void vcpu_ioctl(struct kvm_vcpu *vcpu, unsigned long cmd, void *arg);
int __vcpu_run(struct kvm_vcpu *vcpu);
void kvm_vm_free(struct kvm_vm *vm);
""",
    "processor.h": r"""
#define ARM64_CORE_REG(x) fake_core_reg(#x)
uint64_t fake_core_reg(const char *name);
""",
}
FAKE_LIBRARY = r"""
#include <stdarg.h>
#include "kvm_util.h"

static unsigned int planned, number, failed, vms;
static struct { uint64_t gpa, size; uint8_t *host; } mem[64];
static int nmem;
static struct kvm_run run;

void ksft_print_header(void) { printf("TAP version 13\n"); }
void ksft_set_plan(unsigned int n) { planned = n; printf("1..%u\n", n); }
void ksft_print_msg(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	printf("# ");
	vprintf(fmt, ap);
	va_end(ap);
}
void fake_result(bool ok, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	printf("%sok %u ", ok ? "" : "not ", ++number);
	vprintf(fmt, ap);
	va_end(ap);
	failed += !ok;
}
void ksft_finished(void)
{
	printf("# Totals: pass:%u fail:%u\n# fake: %u VMs not freed\n", number - failed, failed, vms);
	exit(failed || number != planned ? 1 : 0);
}
struct kvm_vm *vm_create_with_one_vcpu(struct kvm_vcpu **vcpu, void *guest_code)
{
	static struct kvm_vm vm = { 4096 };
	static struct kvm_vcpu one = { &run };
	(void)guest_code;
	vms++;
	nmem = 0;
	*vcpu = &one;
	return &vm;
}
void vm_userspace_mem_region_add(struct kvm_vm *vm, enum vm_mem_backing_src_type src, uint64_t gpa,
                                 uint32_t slot, uint64_t npages, uint32_t flags)
{
	(void)src; (void)slot; (void)flags;
	mem[nmem].gpa = gpa;
	mem[nmem].size = npages * vm->page_size;
	mem[nmem].host = calloc(1, mem[nmem].size);
	nmem++;
}
void virt_map(struct kvm_vm *vm, uint64_t vaddr, uint64_t paddr, unsigned int npages)
{
	(void)vm; (void)vaddr; (void)paddr; (void)npages;
}
void *addr_gpa2hva(struct kvm_vm *vm, uint64_t gpa)
{
	(void)vm;
	for (int i = 0; i < nmem; i++)
		if (gpa >= mem[i].gpa && gpa < mem[i].gpa + mem[i].size)
			return mem[i].host + (gpa - mem[i].gpa);
	abort();
}
uint64_t fake_core_reg(const char *name) { return !strcmp(name, "regs.pc"); }
void vcpu_set_reg(struct kvm_vcpu *vcpu, uint64_t id, uint64_t val)
{
	if (id)
		vcpu->pc = val;
}
int __vcpu_get_reg(struct kvm_vcpu *vcpu, uint64_t id, void *val)
{
	if (!id)
		return -1;
	memcpy(val, &vcpu->pc, 8);
	return 0;
}
void vcpu_guest_debug_set(struct kvm_vcpu *vcpu, struct kvm_guest_debug *debug) { (void)vcpu; (void)debug; }
void vcpu_ioctl(struct kvm_vcpu *vcpu, unsigned long cmd, void *arg) { (void)vcpu; (void)cmd; (void)arg; }
int __vcpu_run(struct kvm_vcpu *vcpu)
{
	vcpu->pc += 4;
	vcpu->run->exit_reason = KVM_EXIT_DEBUG;
	return 0;
}
void kvm_vm_free(struct kvm_vm *vm)
{
	(void)vm;
	while (nmem)
		free(mem[--nmem].host);
	vms--;
}
"""


def tap(out: str) -> dict[int, tuple[bool, str]]:
    """Test number -> (passed, name), from the TAP lines of a kselftest."""
    return {int(m[2]): (not m[1], m[3]) for m in re.finditer(r"^(not )?ok (\d+) (.*?)\r?$", out, re.M)}


def test_selftest_reports_every_case_and_a_failure_does_not_stop_the_rest(tmp_path):
    if shutil.which("gcc") is None or not Path("/usr/include/linux/kvm.h").is_file():
        pytest.skip("needs gcc and <linux/kvm.h> on the host")
    straight = parse_case(make("nop\nnop\nnop", name="straight"))
    jumps = parse_case(make("b skip\nnop\nskip:\nnop", name="jumps"))       # stops at 0x10008, not 0x10004
    again = parse_case(make("nop\nnop", name="straight again"))
    src = selftest([straight, jumps, again])
    assert src.count("ksft_test_result(") == 1 and "ksft_test_result_pass" not in src
    code = re.sub(r"/\*.*?\*/|//[^\n]*", "", src, flags=re.S)
    assert "TEST_ASSERT" not in code            # a failing case is a result, not an abort
    for name, text in FAKE_HEADERS.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "fake.c").write_text(FAKE_LIBRARY)
    (tmp_path / "test.c").write_text(src)
    cc = subprocess.run(["gcc", "-std=gnu99", "-O2", "-Wall", "-Werror", "-I", str(tmp_path), "-o", str(tmp_path / "test"),
                         str(tmp_path / "test.c"), str(tmp_path / "fake.c")], capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    p = subprocess.run([str(tmp_path / "test")], capture_output=True, text=True, timeout=60)
    assert p.returncode == KSFT_FAIL, p.stdout + p.stderr
    assert "1..3" in p.stdout
    assert tap(p.stdout) == {1: (True, "straight"), 2: (False, "jumps"), 3: (True, "straight again")}, p.stdout
    assert "# jumps: stop 1 at pc 0x10004, expected 0x10008 (not one instruction per step)" in p.stdout
    assert "pass:2 fail:1" in p.stdout and "0 VMs not freed" in p.stdout


# ---------------------------------------------------------------- the trees, cached

@contextmanager
def locked(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _cached(root: Path, tree: Tree) -> dict | None:
    found = []
    for meta_file in root.glob("*/selftest.json"):
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("tree") == tree.name and (Path(meta["source"]) / "usr" / "include" / "linux" / "kvm.h").is_file():
            found.append((kernels.parse_version(meta["version"]), meta))
    return max(found, key=lambda f: f[0])[1] if found else None


def prepare(tree: Tree, root: Path, log=lambda line: None) -> dict:
    """The tree's metadata (source, layout, build directory), fetching and preparing it when not cached."""
    with locked(root):
        meta = _cached(root, tree)
        if meta:
            return meta
        for tool, package in (("apt-get", "apt"), ("apt-cache", "apt")):
            kernels.need_tool(tool, package)
        apt = kernels.Apt(root.parent, kernels.RELEASES[tree.release], kernels.machine_archive())
        apt.update(log)
        names = kernels._newest_first(apt.names("linux-source-"), tree.package)
        if not names:
            raise RealKvmError(f"no package matching {tree.package} in {', '.join(apt.suites)}")
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            # the newest one the mirror serves (lists can name files a mirror lacks)
            for attempt, package in enumerate(names[:3]):
                record = apt.show(package)
                log(f"{tree.name}: downloading {package} {record['Version']}")
                try:
                    deb = apt.download(package, record["Version"], Path(tmp))
                    break
                except RealKvmError:
                    if attempt + 1 == len(names[:3]):
                        raise
            version = ".".join(map(str, kernels.parse_version(record["Version"])))
            dest = root / version
            shutil.rmtree(dest, ignore_errors=True)             # an unfinished earlier attempt
            dest.mkdir(parents=True)
            log(f"{tree.name}: extracting")
            extract(deb, dest)
        source = next(dest.glob("linux-source-*"))
        log(f"{tree.name}: make headers")
        p = subprocess.run(["make", "-C", str(source), "ARCH=arm64", f"-j{JOBS}", "headers"],
                           capture_output=True, text=True, env=clean_env(), timeout=900)
        if p.returncode != 0:
            pytest.fail(f"make headers in {source} failed:\n{(p.stdout + p.stderr)[-3000:]}")
        kvm = source / "tools" / "testing" / "selftests" / "kvm"
        layout = "arm64" if (kvm / "arm64").is_dir() else "aarch64"     # arm64/ since 6.14
        meta = {"tree": tree.name, "package": package, "deb_version": record["Version"], "version": version,
                "source": str(source), "layout": layout, "build": str(dest / "build")}
        (dest / "selftest.json").write_text(json.dumps(meta, indent=2) + "\n")
        return meta


def extract(deb: Path, dest: Path) -> None:
    """Only the parts of the kernel tarball that the headers and the KVM selftests need."""
    keep = " ".join(shlex.quote(f"*/{path}") for path in KEEP)
    script = (f"set -o pipefail; dpkg-deb --fsys-tarfile {shlex.quote(str(deb))}"
              f" | tar -xO --wildcards './usr/src/linux-source-*.tar.xz' | xz -dc"
              f" | tar -x -C {shlex.quote(str(dest))} --wildcards --no-wildcards-match-slash"
              f" --exclude='*/tools/perf' {keep}")
    p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=900)
    if p.returncode != 0 or not list(dest.glob("linux-source-*/tools/testing/selftests/kvm")):
        raise RealKvmError(f"cannot extract {deb.name}: {p.stderr.strip()[-500:] or 'no KVM selftests in it'}")


@pytest.fixture(scope="session")
def tree():
    """name -> prepared tree metadata; skips (fails on CI) when the source cannot be had."""
    got: dict[str, dict | str] = {}           # the tree, or why there is none

    def get(name: str) -> dict:
        if name not in got:
            missing = [f"{tool} is missing (Debian package {package})"
                       for tool, package in BUILD_TOOLS if shutil.which(tool) is None]
            try:
                got[name] = missing[0] if missing else prepare(TREES[name], cache_root() / "selftests")
            except RealKvmError as e:
                got[name] = f"the kernel source for the {name} selftest library cannot be fetched: {e}"
        if isinstance(got[name], str):
            unavailable(got[name])
        return got[name]
    return get


# ---------------------------------------------------------------- building a test

@dataclass
class Built:
    binary: Path
    source: str             # the exported C
    log: str                # make's output


def build(meta: dict, c_file: Path, name: str, out_dir: Path) -> Built:
    """Build `c_file` as the selftest `name` in the tree, as upstream builds its tests."""
    root = Path(meta["build"]).parents[1]           # <cache>/selftests
    kvm = Path(meta["source"]) / "tools" / "testing" / "selftests" / "kvm"
    layout, output = meta["layout"], Path(meta["build"])
    placed = kvm / layout / f"{name}.c"
    target = output / layout / name
    with locked(root):
        shutil.copyfile(c_file, placed)
        try:
            target.unlink(missing_ok=True)
            p = subprocess.run(["make", "-C", str(kvm), "ARCH=arm64", "CROSS_COMPILE=aarch64-linux-gnu-",
                                f"OUTPUT={output}", f"TEST_GEN_PROGS_{layout}={layout}/{name}",
                                "EXTRA_CFLAGS=-static", f"-j{JOBS}", str(target)],
                               capture_output=True, text=True, env=clean_env(), timeout=900)
        finally:
            placed.unlink(missing_ok=True)
        log = p.stdout + p.stderr
        assert p.returncode == 0 and target.is_file(), f"building {name} in {kvm} failed:\n{log[-6000:]}"
        binary = out_dir / f"{name}-{meta['tree']}"
        shutil.copyfile(target, binary)
    return Built(binary, c_file.read_text(), log)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """The two exports: one case (`export --selftest`) and the known corpus (`export-corpus`)."""
    d = tmp_path_factory.mktemp("exported")
    p = stepfuzz("export", CASE, "--selftest", "-o", d / "stepfuzz_immediate_exit.c")
    assert p.returncode == 0, p.stderr
    p = stepfuzz("export-corpus", CORPUS / "known", "-o", d / "corpus")
    assert p.returncode == 0, p.stderr
    return {"stepfuzz_immediate_exit": d / "stepfuzz_immediate_exit.c",
            "stepfuzz_single_step": d / "corpus" / "stepfuzz_single_step.c"}


@pytest.fixture(scope="session")
def built(tree, exported, tmp_path_factory):
    """(tree name, test name) -> Built, once per session."""
    out = tmp_path_factory.mktemp("selftests")
    got: dict[tuple[str, str], Built] = {}

    def get(tree_name: str, name: str) -> Built:
        if (tree_name, name) not in got:
            got[tree_name, name] = build(tree(tree_name), exported[name], name, out)
        return got[tree_name, name]
    return get


def static_aarch64(path: Path) -> str:
    """'' when `path` is a static aarch64 executable, else what it is."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return "not a 64-bit little-endian ELF file"
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    if e_machine != 183:                            # EM_AARCH64
        return f"ELF machine {e_machine}, not aarch64"
    if e_type != 2:                                 # ET_EXEC (a static PIE would be ET_DYN)
        return f"ELF type {e_type}, not a non-PIE executable"
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    types = [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]
    if 2 in types or 3 in types:                    # PT_DYNAMIC, PT_INTERP
        return "dynamically linked"
    return ""


# ---------------------------------------------------------------- it compiles and links

@pytest.mark.parametrize("name", ["stepfuzz_immediate_exit", "stepfuzz_single_step"])
@pytest.mark.parametrize("tree_name", list(TREES))
def test_selftest_builds_against_the_real_library_without_warnings(built, tree_name, name):
    b = built(tree_name, name)
    ours = [line for line in b.log.splitlines() if f"{name}.c:" in line]
    assert not ours, "diagnostics in the exported file:\n" + "\n".join(ours)
    assert "-Wall" in b.log and "-static" in b.log      # the selftests' own flags, and ours
    assert static_aarch64(b.binary) == ""


# ---------------------------------------------------------------- it runs on real kernels

def run(kernel, b: Built, kernel_name: str) -> tuple[int, str]:
    kernel(kernel_name)
    p = stepfuzz("kvm", "exec", b.binary, "--kernel", kernel_name, "--timeout", "300")
    out = p.stdout + p.stderr
    assert "stepfuzz: error" not in p.stderr, out[-3000:]
    return p.returncode, out


def name_of(case) -> str:
    return case.name or case.source


def test_6_1_fails_on_6_1_at_the_stop_after_the_mmio_access(kernel, built):
    status, out = run(kernel, built("6.1", "stepfuzz_immediate_exit"), "6.1")
    name = name_of(load_case(CASE))
    # a recorded failure of the one test, not an abort (TEST_ASSERT_EXIT, "Test Assertion Failure")
    assert status == KSFT_FAIL, out
    assert "Test Assertion Failure" not in out and tap(out) == {1: (False, name)}, out
    assert "pass:0 fail:1" in out, out
    m = re.search(r": stop (\d+) at pc (0x[0-9a-f]+), expected (0x[0-9a-f]+) \(not one instruction per step\)", out)
    assert m and f"{name}: stop" in out, out
    # nop, then `ldr x1, [x2]` exits to userspace; immediate_exit; the next stop is two instructions on
    assert m.groups() == ("2", "0x1000c", "0x10008"), out


@pytest.mark.parametrize("tree_name", list(TREES))
def test_immediate_exit_case_passes_on_latest(kernel, built, tree_name):
    status, out = run(kernel, built(tree_name, "stepfuzz_immediate_exit"), "latest")
    assert status == 0, out
    assert f"ok 1 {name_of(load_case(CASE))}" in out and "pass:1 fail:0" in out


def test_corpus_selftest_passes_on_latest(kernel, built):
    status, out = run(kernel, built("latest", "stepfuzz_single_step"), "latest")
    n = len(list((CORPUS / "known").glob("*.json")))
    assert status == 0, out
    assert f"1..{n}" in out and f"pass:{n} fail:0" in out


def test_corpus_selftest_on_6_1_reports_every_case_and_fails_those_6_1_gets_wrong(kernel, built):
    b = built("6.1", "stepfuzz_single_step")
    status, out = run(kernel, b, "6.1")
    by_name = {name_of(c): c for c in map(load_case, (CORPUS / "known").glob("*.json"))}
    order = [bytes(n, "ascii").decode("unicode_escape") for n in re.findall(r'\.name = "((?:[^"\\]|\\.)*)"', b.source)]
    assert sorted(order) == sorted(by_name)
    # the era model for 6.1 says which cases 6.1 gets wrong, as the selftest runs them
    wrong = [n for n in order if check(as_reproduced(by_name[n]), [ERAS["6.1"]])[0].divergence is not None]
    first = order.index(wrong[0])
    assert status == KSFT_FAIL, out
    for i, n in enumerate(order[:first]):
        assert f"ok {i + 1} {n}\n" in out, out
    assert f"{wrong[0]}: stop " in out and "(not one instruction per step)" in out, out
    # the cases after the first wrong one run too, each with its own result
    assert "Test Assertion Failure" not in out and f"1..{len(order)}" in out, out
    assert tap(out) == {i + 1: (n not in wrong, n) for i, n in enumerate(order)}, out
    assert f"pass:{len(order) - len(wrong)} fail:{len(wrong)}" in out, out
