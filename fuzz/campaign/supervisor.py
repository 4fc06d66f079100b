"""`stepfuzz fuzz`: run and watch a libFuzzer campaign of the atheris harness.

The supervisor starts libFuzzer (one process, or -jobs/-workers sharing one
corpus), prints a live status line, appends a stats record every few
seconds to <crashes>/stats.jsonl and ends with a summary.  Everything a
campaign keeps lives in the corpus and crash directories, so running it
again on the same directories resumes it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stepfuzz.oracle.case import CaseError, load_case
from stepfuzz.oracle.realkvm import cache_root, last_line

from stepfuzz.fuzz.findings.crashdir import OutputError, UnreadableRecord, crash_dirs, printable, scan
from stepfuzz.fuzz.findings.store import now_iso, write_atomic
from stepfuzz.fuzz.harness.workers import read_workers
from stepfuzz.fuzz.inputs.encoding import MAX_STEPS_BOUND, looks_like_json

STATS_EVERY_S = 10.0
RATE_WINDOW_S = 10.0
STOP_GRACE_S = 30.0       # after a stop request, libFuzzer is killed if it still runs
LIBFUZZER_LINE = re.compile(r"^#(\d+)\s+(\w+)\s+cov: (\d+) ft: (\d+)(?: corp: (\d+)/\S+)?.*?exec/s: (\d+)")
DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


# The stepfuzz command as a child process (rediscover and bench run campaigns
# as a user would)
STEPFUZZ_COMMAND = (sys.executable, "-m", "stepfuzz.fuzz.cli.main")


def parse_duration(text: str) -> float:
    """'90', '30s', '5m', '8h', '1h30m' -> seconds."""
    pos, total = 0, 0.0
    text = text.strip().lower()
    for m in DURATION.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text or total <= 0:
        raise ValueError(f"not a duration: {text!r} (examples: 90, 30s, 5m, 8h, 1h30m)")
    return total


@dataclass
class Config:
    eras: str = "all"
    seconds: float | None = None
    runs: int | None = None
    jobs: int = 1
    corpus: Path = Path("corpus")
    crashes: Path = Path("crashes")
    seed: int | None = None
    max_steps: int = MAX_STEPS_BOUND
    code_coverage: bool = False
    extra: list[str] = field(default_factory=list)
    quiet: bool = False


def harness_launcher() -> Path:
    """An executable that starts the harness with this Python: libFuzzer's
    -jobs and -fork modes re-execute argv[0]. It imports the harness from
    the copy of stepfuzz that wrote it (a checkout or an installed package):
    a campaign runs the code that started it, whatever else is installed."""
    root = str(Path(__file__).resolve().parents[2])     # holds oracle/ and fuzz/
    # one per copy and Python, so two checkouts' campaigns never swap code
    tag = hashlib.sha256(f"{sys.executable}\0{root}".encode()).hexdigest()[:12]
    path = cache_root() / "bin" / tag / "stepfuzz_fuzzer"
    # `stepfuzz` is the folder holding oracle/ and fuzz/ (see pyproject.toml)
    text = (f"#!{sys.executable}\nimport importlib.machinery, importlib.util, sys\n"
            "spec = importlib.machinery.ModuleSpec('stepfuzz', None, is_package=True)\n"
            f"spec.submodule_search_locations = [{root!r}]\n"
            "sys.modules['stepfuzz'] = importlib.util.module_from_spec(spec)\n"
            "from stepfuzz.fuzz.harness.stepfuzz_fuzzer import main\nmain()\n")
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text)
        path.chmod(0o755)
    return path


def scan_corpus(corpus: Path) -> tuple[int, list[str]]:
    """Count the entries; one warning per case file that cannot be read (left in place)."""
    count, warnings = 0, []
    for p in sorted(corpus.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        count += 1
        with open(p, "rb") as f:
            head = f.read(64)
        if p.suffix == ".json" or looks_like_json(head):
            try:
                load_case(p)
            except CaseError as e:
                warnings.append(f"{e} (skipped by the harness, left in place)")
    return count, warnings


class Monitor:
    """Collects progress from libFuzzer's output and the workers' files."""

    def __init__(self, cfg: Config, started: float, warn=None):
        self.cfg, self.started = cfg, started
        self.cov = self.ft = 0
        self.recent: list[tuple[float, int]] = []     # (time, execs) over the last RATE_WINDOW_S
        self.eras: dict[str, str] = {}                # crash directory -> its era (read once)
        self.offsets: dict[Path, int] = {}            # how far each worker log has been read
        self.unreadable: dict[str, UnreadableRecord] = {}   # crash directory -> why its record is not counted
        self.warn = warn if warn is not None else (lambda m: print(m, file=sys.stderr, flush=True))

    def feed(self, line: str) -> None:
        m = LIBFUZZER_LINE.match(line)
        if m:
            self.cov, self.ft = max(self.cov, int(m.group(3))), max(self.ft, int(m.group(4)))

    def tail(self, path: Path) -> None:
        """Feed the lines a worker has added to its log since the last call."""
        try:
            with open(path, errors="replace") as f:
                f.seek(self.offsets.get(path, 0))
                for line in f:
                    self.feed(line)
                self.offsets[path] = f.tell()
        except OSError:
            pass

    def _findings(self) -> tuple[int, Counter]:
        """(root causes, root causes seen on each era), read afresh: a root
        cause can meet a new era at any time.  A directory written before
        root causes counts as its own.  One whose record cannot be read is
        not counted; it is reported once, by name."""
        roots: set[str] = set()
        by_era: Counter = Counter()
        for cd in crash_dirs(self.cfg.crashes):
            try:
                rec = cd.read_record()
                self.unreadable.pop(cd.name, None)
            except UnreadableRecord as e:
                if cd.name not in self.unreadable:
                    self.warn(f"stepfuzz: warning: {e}")
                self.unreadable[cd.name] = e
                continue
            roots.add(rec.root_signature or cd.name)
            by_era.update(rec.eras.keys() if rec.eras else [rec.era])
        return len(roots), by_era

    def workers(self) -> list[dict]:
        return [w for w in read_workers(self.cfg.crashes) if w["begun"] >= self.started - 1]

    def snapshot(self) -> dict:
        now = time.time()
        workers = self.workers()
        execs = sum(w["execs"] for w in workers)
        self.recent = [(t, e) for t, e in self.recent if now - t <= RATE_WINDOW_S] + [(now, execs)]
        t0, e0 = self.recent[0]
        rate = (execs - e0) / (now - t0) if now - t0 >= 1 else 0.0
        roots, by_era = self._findings()
        return {"time": now_iso(), "t": round(now, 3), "elapsed_s": round(now - self.started, 1),
                "execs": execs, "execs_per_s": round(rate, 1),
                "corpus": sum(1 for p in self.cfg.corpus.rglob("*") if p.is_file()),
                "cov": self.cov, "ft": self.ft,
                "rss_mb": round(sum(w["rss_kb"] for w in workers) / 1024, 1),
                "workers": len([w for w in workers if not w["final"]]),
                "unique": roots, "roots": roots, "by_era": dict(sorted(by_era.items()))}


def status_line(s: dict) -> str:
    e = int(s["elapsed_s"])
    eras = " ".join(f"{k}:{v}" for k, v in s["by_era"].items()) or "none yet"
    return (f"[{e // 3600:02d}:{e // 60 % 60:02d}:{e % 60:02d}] execs {s['execs']:,} ({s['execs_per_s']:.0f}/s)"
            f"  corpus {s['corpus']}  cov {s['cov']}  root causes {s['unique']} (seen on {eras})")


class CampaignError(RuntimeError):
    """A campaign that cannot start; str() is one line."""


def open_campaign(corpus: Path, crashes: Path, *more: Path):
    """Create a campaign's directories and take its lock (held until the
    process ends: the returned file); CampaignError if they cannot be
    written or another campaign holds them."""
    try:
        for d in (corpus, crashes, *more):
            d.mkdir(parents=True, exist_ok=True)
        lock = open(crashes / ".campaign.lock", "w")
    except OSError as e:
        raise CampaignError(f"{e.filename or crashes}: cannot write: {e.strerror or e}") from None
    import fcntl
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise CampaignError(f"{crashes}: another campaign is running on it (stepfuzz status {crashes})") from None
    return lock


def new_seed(seed: int | None) -> int:
    return seed if seed is not None else int.from_bytes(os.urandom(4), "little") % 2_000_000_000 + 1


def run(cfg: Config) -> int:
    """Run a campaign; raises CampaignError if it cannot start (its
    directories cannot be written, another campaign holds them)."""
    lock = open_campaign(cfg.corpus, cfg.crashes, cfg.crashes / "logs", cfg.crashes / "artifacts")
    try:
        return _run(cfg, lock)
    except OutputError as e:
        raise CampaignError(str(e)) from None


def _run(cfg: Config, lock) -> int:
    logs = cfg.crashes / "logs"
    seed = new_seed(cfg.seed)
    entries, warnings = scan_corpus(cfg.corpus)
    for w in warnings:
        print(f"stepfuzz: warning: {w}", file=sys.stderr)
    known = sum(1 for _ in crash_dirs(cfg.crashes))
    resuming = (cfg.crashes / "campaign.json").exists()      # an earlier campaign ran on these directories
    started = time.time()
    say = (lambda *a: None) if cfg.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    say(f"stepfuzz: seed {seed} (reuse with --seed {seed}); eras {cfg.eras}; "
        f"corpus {cfg.corpus} ({entries} entries); crashes {cfg.crashes} ({known} known divergences)"
        + ("; resuming" if resuming else ""))
    write_atomic(cfg.crashes / "campaign.json", json.dumps(
        {**{k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
         "seed": seed, "started": started, "started_iso": now_iso(), "pid": os.getpid()}, indent=2))

    argv = [str(harness_launcher()), str(cfg.corpus.resolve()), f"-seed={seed}", "-reduce_inputs=0",
            "-max_len=4096", "-len_control=0", "-timeout=120", "-rss_limit_mb=4096", "-print_final_stats=1",
            f"-artifact_prefix={(cfg.crashes / 'artifacts').resolve()}/"]
    if cfg.seconds:
        argv.append(f"-max_total_time={max(1, int(cfg.seconds))}")
    if cfg.runs is not None:
        argv.append(f"-runs={cfg.runs}")
    if cfg.jobs > 1:
        argv += [f"-jobs={cfg.jobs}", f"-workers={cfg.jobs}"]
    argv += cfg.extra
    env = {**os.environ, "STEPFUZZ_ERAS": cfg.eras, "STEPFUZZ_CRASHES": str(cfg.crashes.resolve()),
           "STEPFUZZ_STARTED": str(started), "STEPFUZZ_MAX_STEPS": str(cfg.max_steps),
           "STEPFUZZ_SUPERVISOR": str(os.getpid()),
           "STEPFUZZ_CODE_COVERAGE": "1" if cfg.code_coverage else "0"}
    proc = subprocess.Popen(argv, cwd=logs, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True,
                            preexec_fn=_die_with_parent)
    monitor = Monitor(cfg, started)
    reader = threading.Thread(target=_pump, args=(proc, logs / "main.log", monitor), daemon=True)
    reader.start()

    stopping: list[float] = []                    # when the user asked to stop
    killed = False

    def stop(signum, _frame):
        stopping.append(time.monotonic())
        # Each worker stops cleanly at its next input.  In -jobs mode only the
        # workers are told, not the shells libFuzzer runs them in: a job whose
        # shell died of SIGINT crashes libFuzzer's parent.  The parent ends by
        # itself once its jobs have ended.
        for pid in ([proc.pid] if cfg.jobs == 1 else _descendants(proc.pid, argv[0])):
            _signal(pid, signal.SIGINT)
    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    stats_path = cfg.crashes / "stats.jsonl"
    next_stats = time.time()
    tty = sys.stderr.isatty() and not cfg.quiet
    try:
        while proc.poll() is None:
            time.sleep(1)
            if stopping and time.monotonic() - stopping[0] > STOP_GRACE_S:
                say(f"stepfuzz: libFuzzer did not stop within {STOP_GRACE_S:.0f} s of the request; killing it")
                _signal(-proc.pid, signal.SIGKILL)     # its whole process group
                stopping.clear()
                killed = True
            for f in logs.glob("fuzz-*.log"):
                monitor.tail(f)
            snap = monitor.snapshot()
            if time.time() >= next_stats:
                next_stats = time.time() + STATS_EVERY_S
                _append(stats_path, snap)
                if not tty:
                    say(status_line(snap))
            if tty:
                print("\r" + status_line(snap), end="", file=sys.stderr, flush=True)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    reader.join(timeout=5)
    snap = monitor.snapshot()
    snap["final"] = True
    _append(stats_path, snap)
    if tty:
        print(file=sys.stderr)
    summary(cfg, snap, started, say)
    stopped = proc.returncode in (0, -signal.SIGINT, 130, 72) or (killed and proc.returncode == -signal.SIGKILL)
    if not stopped:
        try:
            last = last_line((logs / "main.log").read_text(errors="replace"), "")
        except OSError:
            last = ""
        say(f"stepfuzz: libFuzzer exited with status {proc.returncode}" + (f" ({last})" if last else "")
            + f"; its output is in {logs}")
        return 2
    return 0


def summary(cfg: Config, snap: dict, started: float, say) -> None:
    say(status_line(snap))
    new = [f for f in scan(cfg.crashes)
           if f.record.first_found.elapsed_s >= 0 and _iso_t(f.record.first_seen) >= started - 1]
    say(f"stepfuzz: {snap['execs']:,} executions in {snap['elapsed_s']:.0f} s; {len(new)} new root cause(s), "
        f"{snap['unique']} in {cfg.crashes}")
    for f in sorted(new, key=lambda f: f.record.first_found.elapsed_s)[:40]:
        name = f.record.root_signature or f.record.signature
        say(printable(f"  {f.record.first_found.elapsed_s:>8.1f}s  {name}  [{f.dir.path}]"))
    if len(new) > 40:
        say(f"  ... and {len(new) - 40} more: stepfuzz triage {cfg.crashes}")


def _iso_t(text: str) -> float:
    from datetime import datetime
    return datetime.fromisoformat(text).timestamp()


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass                                     # it has just ended


def _descendants(pid: int, program: str) -> list[int]:
    """The processes below `pid` that run `program` (from /proc: Linux, as the
    rest of stepfuzz)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue                             # gone meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            try:
                args = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if program.encode() in args:
                out.append(child)
    return out


def _die_with_parent() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)    # PR_SET_PDEATHSIG
    except OSError:
        pass


def _pump(proc: subprocess.Popen, log: Path, monitor: Monitor) -> None:
    """Drain libFuzzer's output into the log, whatever happens to the log:
    a thread that stopped reading would block libFuzzer on a full pipe (a
    full disk once made a 25 s campaign run 11 minutes)."""
    out = None
    try:
        out = open(log, "a")
    except OSError as e:
        monitor.warn(f"stepfuzz: warning: {log}: cannot write libFuzzer's log ({e.strerror}); going on without it")
    for line in proc.stdout:
        monitor.feed(line)
        if out is not None:
            try:
                out.write(line)
                out.flush()
            except OSError as e:
                monitor.warn(f"stepfuzz: warning: {log}: {e.strerror}: libFuzzer's log stops here")
                out = None


def _append(path: Path, record: dict) -> None:
    """One record of stats.jsonl; a full disk loses the record, not the campaign."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError:
        pass
