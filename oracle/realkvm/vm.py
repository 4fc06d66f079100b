"""Build the runner and its initramfs, boot a kernel under QEMU (or run
natively on an arm64 host with /dev/kvm), stream the console, and never hang.

One boot serves batch after batch (a Session).  Whatever goes wrong (boot timeout, kernel
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
TAIL_LINES = 80          # enough for a kernel WARNING and its stack before a panic
# `max` with QEMU's implementation-defined pointer-authentication hash: Debian
# kernels sign every return address and TCG's QARMA5 makes boot 3-4x slower.
# It changes no ID field KVM's single-step or emulation paths depend on.
QEMU_CPU = "max,pauth-impdef=on"


def qemu_command(kernel: Path, initrd: Path) -> list[str]:
    return [QEMU, "-M", "virt,virtualization=on,gic-version=3", "-cpu", QEMU_CPU, "-smp", "2", "-m", "1024",
            "-nographic", "-no-reboot",
            # no network: the default NIC needs an option ROM Debian ships only in a recommended package
            "-nic", "none", "-kernel", str(kernel), "-initrd", str(initrd),
            # the second CPU stays offline until a case needs it (runner.c need_cpus_for)
            "-append", "console=ttyAMA0 panic=-1 quiet maxcpus=1"]


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
    if not files:
        return base_initramfs(runner)
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
    """A child's output, line by line with deadlines (keeping the tail), and
    its input, written only as fast as it reads: a guest that is busy
    printing results must never wait on us while we wait to write to it."""

    def __init__(self, proc: subprocess.Popen[bytes]):
        self.proc = proc
        self.fd = proc.stdout.fileno() if proc.stdout else -1
        self.in_fd = proc.stdin.fileno() if proc.stdin else -1
        if self.in_fd >= 0:
            os.set_blocking(self.in_fd, False)
        self.partial = b""
        self.pending = b""                # input not written yet
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.eof = False

    def send(self, data: bytes) -> None:
        self.pending += data

    def lines(self, timeout: float) -> list[str]:
        """Complete lines that arrive within `timeout` seconds (maybe none);
        pending input is written meanwhile."""
        if self.eof:
            return []
        writing = [self.in_fd] if self.pending and self.in_fd >= 0 else []
        ready, can_write, _ = select.select([self.fd], writing, [], max(0.0, timeout))
        if can_write:
            try:
                n = os.write(self.in_fd, self.pending[:1 << 16])
                self.pending = self.pending[n:]
            except BlockingIOError:
                pass
            except OSError:               # the child is gone: its output says how
                self.pending = b""
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


def _child(kernel: Kernel | None, runner: Path, files: dict[str, bytes], tmp: Path) -> subprocess.Popen[bytes]:
    argv = [str(runner)] if kernel is None else qemu_command(kernel.path, initramfs(runner, files, tmp))
    # QEMU (or the native runner) dies with this thread, even by SIGKILL
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
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


class VmFailure(RealKvmError):
    """A session that cannot go on (did not boot, panicked, hung, exited);
    `problem` is the short reason, str() one line, `console` the tail."""

    def __init__(self, problem: str, console: str):
        self.problem, self.console = problem, console
        super().__init__(f"{problem}: {last_line(console, 'nothing on the console')}")


class Session:
    """One boot of a kernel (or the native runner) serving batch after batch.

    start() boots and waits for the runner; run() sends a batch and collects
    its traces; close() powers off.  A session that fails (boot timeout,
    panic, a case that never ends, the VM gone) is dead: run() returns what
    had finished and the problem, and the caller starts another.  The child
    dies with the thread that started it, even by SIGKILL."""

    def __init__(self, kernel: Kernel | None, root: Path | None = None, boot_timeout: float = BOOT_TIMEOUT,
                 echo: Callable[[str], None] | None = None, files: dict[str, bytes] | None = None):
        check_tools(kernel)
        self.kernel, self.boot_timeout, self.echo = kernel, boot_timeout, echo
        self.runner = build_runner(root, for_native=kernel is None)
        self.files = files or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.con: Console | None = None
        self.parser = Parser({})
        self.boot_seconds: float | None = None
        self.problem = ""
        self._tmp: tempfile.TemporaryDirectory | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and not self.problem

    def start(self, extra_s: float = 0.0) -> None:
        """Boot; VmFailure if the runner is not ready within the boot timeout
        (in exec mode: the program has not ended within it plus `extra_s`)."""
        self._tmp = tempfile.TemporaryDirectory(prefix="stepfuzz-kvm-")
        t0 = time.monotonic()
        self.proc = _child(self.kernel, self.runner, self.files, Path(self._tmp.name))
        self.con = Console(self.proc)
        if "prog" in self.files:
            self._pump(lambda: self.parser.exec_status is not None, t0 + self.boot_timeout + extra_s,
                       "timeout")
        else:
            self._pump(lambda: self.parser.ready, t0 + self.boot_timeout, "boot-timeout")
        if self.problem:
            tail = self.con.tail_text()
            self.close()
            raise VmFailure(self.problem, tail)
        self.boot_seconds = time.monotonic() - t0

    def _pump(self, done: Callable[[], bool], deadline: float, late: str,
              on_case: Callable[[], float] | None = None) -> None:
        """Feed the parser until done(), a failure or the deadline (then the
        problem is `late`).  on_case: called when a case begins or ends,
        returns that case's deadline."""
        assert self.con is not None
        last_case = self.parser.current
        while not done():
            now = time.monotonic()
            if now > deadline:
                self.problem = late
                return
            for line in self.con.lines(min(deadline - now, 1.0)):
                if self.echo:
                    self.echo(line)
                self.parser.feed(line)
                if "Kernel panic" in line:
                    self.problem = "kernel-panic"
            if self.parser.fatal:
                self.problem = "runner: " + self.parser.fatal
            elif self.con.eof and not done():
                self.problem = self.problem or ("vm-exited" if self.parser.ready else "boot-failed")
            if self.problem:
                return
            if on_case is not None and self.parser.current != last_case:
                last_case = self.parser.current
                deadline = on_case()

    def run(self, send: list[tuple[int, Case]], sources: dict[int, str] | None = None
            ) -> tuple[dict[int, RealTrace], str]:
        """Run one batch ((id, case) pairs): the traces of the cases that
        ended, and '' or the problem that killed the session."""
        assert self.con is not None and self.alive
        self.parser.start_batch(sources or {i: str(i) for i, _ in send})
        budgets = {i: case_timeout_ms(case) / 1000 for i, case in send}
        self.con.send(encode(send).encode())

        def case_deadline() -> float:
            # the runner writes a case's lines when it ends, `begin` included:
            # after an end, the next case may already be running its budget
            cur = self.parser.current
            if cur is None:
                left = [b for i, b in budgets.items() if i not in self.parser.traces]
                return time.monotonic() + max(left, default=0.0) + GRACE
            return time.monotonic() + budgets.get(cur, 0.0) + GRACE

        self._pump(lambda: self.parser.done, time.monotonic() + GRACE + (max(budgets.values()) if budgets else 0),
                   "host-timeout", case_deadline)
        finished = {i: t for i, t in self.parser.traces.items() if t.end}
        return finished, self.problem

    def close(self) -> None:
        """Power off (a clean `quit`, then a kill if need be); never raises."""
        if self.proc is not None:
            if self.alive and self.con is not None:
                self.con.send(b"quit\n")
                end = time.monotonic() + GRACE
                while not self.con.eof and time.monotonic() < end:
                    self.con.lines(end - time.monotonic())
            _stop(self.proc)
            self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- public entry points

UNFINISHED = "the run stopped before this case ended"


def unfinished(t: RealTrace | None, source: str, problem: str, console: str) -> RealTrace:
    """The trace of a case a failed session did not finish."""
    t = t or RealTrace(source)
    t.end = f"error:{problem or 'vm-exited'}"
    t.detail = UNFINISHED
    t.console = console
    return t


def run_cases(cases: list[tuple[str, Case]], kernel: Kernel | None, root: Path | None = None,
              boot_timeout: float = BOOT_TIMEOUT, echo: Callable[[str], None] | None = None,
              era: "Era | None" = None) -> tuple[list[RealTrace], RunStats]:
    """Run `cases` ((source, case) pairs) on `kernel` (None: natively), one
    boot for all.  With `era` (the kernel's), a case that needs a KVM feature
    the era lacks is not sent."""
    check_tools(kernel)
    logs = [execute(case) for _, case in cases]
    traces: list[RealTrace | None] = [skip_reason(case, log, era) for (_, case), log in zip(cases, logs)]
    send = [(i, case) for i, (_, case) in enumerate(cases) if traces[i] is None]
    stats = RunStats(sent=len(send))
    t0 = time.monotonic()
    if send:
        session = Session(kernel, root, boot_timeout, echo)
        finished: dict[int, RealTrace] = {}
        console = ""
        try:
            session.start()
            stats.boot_seconds = session.boot_seconds
            finished, stats.problem = session.run(send, {i: cases[i][0] for i, _ in send})
            console = session.con.tail_text() if session.con else ""
        except VmFailure as e:
            stats.problem, console = e.problem, e.console
        finally:
            session.close()
        for i, _ in send:
            t = finished.get(i)
            traces[i] = t if t is not None else unfinished(session.parser.traces.get(i), cases[i][0],
                                                           stats.problem, console)
    stats.seconds = time.monotonic() - t0
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

    session = Session(kernel, root, boot_timeout, relay, files={"prog": program.read_bytes()})
    stats = RunStats()
    t0 = time.monotonic()
    try:
        session.start(extra_s=timeout)
    except VmFailure as e:
        stats.problem, stats.seconds = e.problem, time.monotonic() - t0
        return -1, stats, e.console
    status = session.parser.exec_status or ""
    session.close()
    stats.seconds = time.monotonic() - t0
    if status.startswith("status "):
        return int(status.split()[1]), stats, ""
    if status.startswith("signal "):
        return 128 + int(status.split()[1]), stats, ""
    return -1, stats, "(no exit status)"
