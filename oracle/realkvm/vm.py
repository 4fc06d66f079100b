"""Build the runner and its initramfs, boot a kernel under QEMU (or run
natively on an arm64 host with /dev/kvm), stream the console, and never hang.

One boot runs a whole batch.  Whatever goes wrong (boot timeout, kernel
panic, runner crash, a case that never ends), QEMU is killed, finished
cases keep their results and every unfinished case becomes an error that
carries the console's last lines.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import platform
import select
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..case import Case
from ..kvm.eras import Era
from ..guest import execute
from . import RealKvmError, cache_root, last_line, need_tool
from .batch import Parser, RealTrace, case_timeout_ms, encode, infer_steps, skip_reason
from .kernels import Kernel

RUNNER_SRC = Path(__file__).with_name("runner.c")
VMM_SRC = Path(__file__).with_name("vmm.c")        # included by runner.c
VMM_HEADER = Path(__file__).with_name("stepfuzz_vmm.h")   # included by vmm.c, inlined by the exports
RUNNER_SOURCES = (RUNNER_SRC, VMM_SRC, VMM_HEADER)  # everything the build reads: the cache key
CROSS_CC, CROSS_CC_PACKAGE = "aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"
QEMU, QEMU_PACKAGE = "qemu-system-aarch64", "qemu-system-arm"
KVM_HEADER_PACKAGE = "linux-libc-dev-arm64-cross"
CROSS_LIBC_PACKAGE = "libc6-dev-arm64-cross"
CFLAGS = ["-static", "-O2", "-Wall", "-Werror"]
BOOT_TIMEOUT = 120.0          # seconds until the runner says it is ready
GRACE = 15.0                  # seconds of slack per case, and for QEMU to exit
TAIL_LINES = 25
# `max` with QEMU's implementation-defined pointer-authentication hash: Debian
# kernels sign every return address and TCG's QARMA5 makes boot 3-4x slower.
# It changes no ID field KVM's single-step or emulation paths depend on.
QEMU_CPU = "max,pauth-impdef=on"


def qemu_command(kernel: Path, initrd: Path) -> list[str]:
    return [QEMU, "-M", "virt,virtualization=on,gic-version=3", "-cpu", QEMU_CPU, "-smp", "2", "-m", "1024",
            "-nographic", "-no-reboot",
            # no network: the default NIC needs an option ROM Debian ships only in a recommended package
            "-nic", "none", "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyAMA0 panic=-1 quiet"]


def native() -> bool:
    """An arm64 host with /dev/kvm runs the runner directly."""
    return platform.machine() in ("aarch64", "arm64") and os.path.exists("/dev/kvm")


# ---------------------------------------------------------------- the runner binary

def build_runner(root: Path | None = None, for_native: bool = False) -> Path:
    """Compile runner.c once per (source, compiler); cached under <cache>/runner/<hash>/."""
    root = root or cache_root()
    cc = need_tool("gcc", "gcc") if for_native else need_tool(CROSS_CC, CROSS_CC_PACKAGE)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    source = b"\0".join(src.read_bytes() for src in RUNNER_SOURCES)     # no NUL in C source: unambiguous
    key = hashlib.sha256(source + version.encode() + " ".join([cc, *CFLAGS]).encode()).hexdigest()[:16]
    out = root / "runner" / key / "runner"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    p = subprocess.run([cc, *CFLAGS, "-o", str(tmp), str(RUNNER_SRC)], capture_output=True, text=True)
    if p.returncode != 0:
        if "linux/kvm.h" in p.stderr:
            raise RealKvmError(f"<linux/kvm.h> for arm64 not found: install the Debian package {KVM_HEADER_PACKAGE}")
        if not for_native and ("No such file" in p.stderr or "cannot find -lc" in p.stderr):
            raise RealKvmError(f"the arm64 C library is missing: install the Debian package {CROSS_LIBC_PACKAGE}")
        raise RealKvmError(f"cannot compile the runner: {last_line(p.stderr, f'exit {p.returncode}')}")
    tmp.rename(out)
    return out


# ---------------------------------------------------------------- initramfs (cpio newc)

def _newc(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), ino: int = 0) -> bytes:
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
    head = b"070701" + b"".join(b"%08x" % f for f in fields) + name.encode() + b"\0"
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def cpio(entries: list[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    """A newc archive of (name, mode, data, (rdev major, minor)) entries."""
    body = b"".join(_newc(n, m, d, r, i + 1) for i, (n, m, d, r) in enumerate(entries))
    return body + _newc("TRAILER!!!", 0)


def base_initramfs(runner: Path) -> Path:
    """/init (the runner), /dev, /dev/console and /proc: built once per runner."""
    path = runner.with_name("init.cpio.gz")
    if not path.is_file():
        archive = cpio([("dev", 0o40755, b"", (0, 0)), ("dev/console", 0o20600, b"", (5, 1)),
                        ("proc", 0o40555, b"", (0, 0)), ("init", 0o100755, runner.read_bytes(), (0, 0))])
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(gzip.compress(archive, 6))
        tmp.rename(path)
    return path


def initramfs(runner: Path, files: dict[str, bytes], into: Path) -> Path:
    """The cached base archive followed by one with `files` (the kernel unpacks both)."""
    extra = cpio([(name, 0o100755 if name == "prog" else 0o100644, data, (0, 0)) for name, data in files.items()])
    out = into / "initrd.img"
    out.write_bytes(base_initramfs(runner).read_bytes() + gzip.compress(extra, 1))
    return out


# ---------------------------------------------------------------- streaming a run

@dataclass
class RunStats:
    boot_seconds: float | None = None     # until the runner was ready
    seconds: float = 0.0                  # the whole run
    sent: int = 0
    problem: str = ""                     # why the run stopped early, if it did


class Console:
    """Reads a child's output line by line with deadlines; keeps the tail."""

    def __init__(self, proc: subprocess.Popen[bytes]):
        self.proc = proc
        self.fd = proc.stdout.fileno() if proc.stdout else -1
        self.partial = b""
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.eof = False

    def lines(self, timeout: float) -> list[str]:
        """Complete lines that arrive within `timeout` seconds (maybe none)."""
        if self.eof:
            return []
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not ready:
            return []
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            self.eof = True
            chunk, self.partial = self.partial + b"\n", b""
            if chunk == b"\n":
                return []
        data = self.partial + chunk
        *complete, self.partial = data.split(b"\n")
        out = [c.decode(errors="replace").rstrip("\r") for c in complete]
        self.tail.extend(l for l in out if l.strip())
        return out

    def tail_text(self) -> str:
        return "\n".join(self.tail) or "(nothing on the console)"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _stream(proc: subprocess.Popen[bytes], parser: Parser, budgets: dict[int, float], boot_timeout: float,
            stats: RunStats, on_line: Callable[[str], None] | None = None) -> Console:
    """Feed the parser until the runner is done, the child exits or a deadline passes."""
    con = Console(proc)
    start = time.monotonic()
    deadline = start + boot_timeout
    overall = deadline + sum(budgets.values()) + GRACE * (len(budgets) + 1)
    last_case: int | None = None
    while True:
        now = time.monotonic()
        if now > min(deadline, overall):
            stats.problem = "boot-timeout" if not parser.ready else "host-timeout"
            break
        for line in con.lines(min(deadline, overall) - now):
            if on_line:
                on_line(line)
            was_ready = parser.ready
            parser.feed(line)
            if "Kernel panic" in line:
                stats.problem = stats.problem or "kernel-panic"
            if parser.ready and not was_ready:
                stats.boot_seconds = time.monotonic() - start
        now = time.monotonic()
        if parser.fatal:
            stats.problem = "runner: " + parser.fatal
            break
        if parser.done or parser.exec_status is not None:
            break
        if con.eof:
            stats.problem = stats.problem or ("vm-exited" if parser.ready else "boot-failed")
            break
        if parser.ready and parser.current != last_case:
            # a case began (or ended): give it its own budget from now
            last_case = parser.current
            deadline = now + (budgets.get(last_case, 0.0) if last_case is not None else 0.0) + GRACE
    # Let QEMU power off by itself after a clean end; kill it otherwise.
    if not stats.problem:
        try:
            proc.wait(timeout=GRACE)
        except subprocess.TimeoutExpired:
            pass
    _stop(proc)
    stats.seconds = time.monotonic() - start
    return con


def _child(kernel: Kernel | None, runner: Path, files: dict[str, bytes], tmp: Path) -> subprocess.Popen[bytes]:
    if kernel is None:
        batch = tmp / "cases"
        batch.write_bytes(files["cases"])
        argv = [str(runner), str(batch)]
    else:
        argv = qemu_command(kernel.path, initramfs(runner, files, tmp))
    # QEMU (or the native runner) dies with this process, even by SIGKILL
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=_die_with_parent)


def _die_with_parent() -> None:
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG
    except OSError:
        pass


def check_tools(kernel: Kernel | None) -> None:
    if kernel is not None:
        need_tool(QEMU, QEMU_PACKAGE)


# ---------------------------------------------------------------- public entry points

def run_cases(cases: list[tuple[str, Case]], kernel: Kernel | None, root: Path | None = None,
              boot_timeout: float = BOOT_TIMEOUT, echo: Callable[[str], None] | None = None,
              era: "Era | None" = None) -> tuple[list[RealTrace], RunStats]:
    """Run `cases` ((source, case) pairs) on `kernel` (None: natively), one
    boot for all.  With `era` (the kernel's), a case that needs a KVM feature
    the era lacks is not sent."""
    check_tools(kernel)
    runner = build_runner(root, for_native=kernel is None)
    logs = [execute(case) for _, case in cases]
    traces: list[RealTrace | None] = [skip_reason(case, log, era) for (_, case), log in zip(cases, logs)]
    send = [(i, case) for i, (_, case) in enumerate(cases) if traces[i] is None]
    stats = RunStats(sent=len(send))
    if send:
        parser = Parser({i: cases[i][0] for i, _ in send})
        budgets = {i: case_timeout_ms(case) / 1000 for i, case in send}
        with tempfile.TemporaryDirectory(prefix="stepfuzz-kvm-") as tmp:
            proc = _child(kernel, runner, {"cases": encode(send).encode()}, Path(tmp))
            con = _stream(proc, parser, budgets, boot_timeout, stats, echo)
        for i, _ in send:
            t = parser.traces.get(i)
            if t is None or not t.end:
                t = t or RealTrace(cases[i][0])
                t.end = f"error:{stats.problem or 'vm-exited'}"
                t.detail = "the run stopped before this case ended"
                t.console = con.tail_text()
            traces[i] = t
    out: list[RealTrace] = []
    for t, log, (source, _) in zip(traces, logs, cases):
        assert t is not None
        t.source = source
        infer_steps(t, log)
        out.append(t)
    return out, stats


def run_program(program: Path, kernel: Kernel | None, root: Path | None = None,
                boot_timeout: float = BOOT_TIMEOUT, timeout: float = 600.0) -> tuple[int, RunStats, str]:
    """Boot `kernel` with `program` as /prog, relay its output; (exit status, stats, console tail)."""
    if kernel is None:
        try:
            p = subprocess.run([str(program.resolve())])
        except OSError as e:
            raise RealKvmError(f"{program}: cannot run it: {e.strerror}") from None
        return p.returncode, RunStats(), ""
    check_tools(kernel)
    runner = build_runner(root)
    parser = Parser({})
    stats = RunStats()
    relaying = False

    def relay(line: str) -> None:
        nonlocal relaying
        if line.startswith("@@sf exec-start"):
            relaying = True
        elif line.startswith("@@sf exec-exit"):
            relaying = False
        elif relaying and line.startswith("| "):     # the program's own lines (runner.c relay_lines)
            sys.stdout.write(line[2:] + "\n")
            sys.stdout.flush()

    parser.ready = True          # exec mode has no ready line; the boot budget still applies
    with tempfile.TemporaryDirectory(prefix="stepfuzz-exec-") as tmp:
        proc = _child(kernel, runner, {"prog": program.read_bytes()}, Path(tmp))
        con = _stream(proc, parser, {0: timeout}, boot_timeout + timeout, stats, relay)
    status = parser.exec_status or ""
    if status.startswith("status "):
        return int(status.split()[1]), stats, ""
    if status.startswith("signal "):
        return 128 + int(status.split()[1]), stats, ""
    return -1, stats, con.tail_text()
