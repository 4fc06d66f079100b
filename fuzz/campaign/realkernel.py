"""`stepfuzz fuzz --kernel K`: a campaign whose target is a real kernel.

Inputs come from the same generator, mutator and corpus as in-process
campaigns.  They run in batches inside long-lived VMs, one per worker
thread (one boot per worker, not per batch: oracle.realkvm.vm.Session).
Each real trace is judged against the reference and against the kernel's
era model (oracle.realkvm.check.judge); the verdicts worth keeping --
a divergence the model confirms, a model gap, a new-bug candidate, a case
that kills the VM twice -- go to the crash store, in directories marked
with the kernel (version and image sha256).  The behaviours of the real
traces (kinds of stop, the exits before them, endings, verdicts) decide
which inputs join the corpus, as behaviour features do in-process.

A VM that panics, hangs or exits is restarted and its batch retried from
the first unfinished case; a case that kills two VMs is kept as a finding
and not run again.  With --jobs 1 the same seed, corpus and kernel give
the same inputs in the same order; with more workers batches complete in
whatever order the VMs finish them.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import signal
import sys
import threading
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from stepfuzz.oracle.case import Case
from stepfuzz.oracle.compare import Divergence
from stepfuzz.oracle.guest import ExecLog, execute
from stepfuzz.oracle.reference import reference
from stepfuzz.oracle.kvm.eras import Era, select
from stepfuzz.oracle.realkvm import RealKvmError, cache_root, kernels, last_line
from stepfuzz.oracle.realkvm import vm as realvm
from stepfuzz.oracle.realkvm.batch import TIMING, RealTrace, infer_steps, needs_second_cpu, skip_reason
from stepfuzz.oracle.realkvm.check import CONFIRMED, MODEL_GAP, NEW_BUG, compare_one, judge
from stepfuzz.oracle.run import Result
from stepfuzz.oracle.trace import Trace
from stepfuzz.oracle.vocabulary import DivergenceKind

from stepfuzz.fuzz.campaign.supervisor import (STATS_EVERY_S, CampaignError, _append, new_seed, open_campaign,
                                               status_line, summary)
from stepfuzz.fuzz.findings.crashdir import OutputError, crash_dirs, now_iso, write_atomic
from stepfuzz.fuzz.findings.report import model_vs_real_table
from stepfuzz.fuzz.findings.rootcause import root_of_verdict, root_of_vm_death
from stepfuzz.fuzz.findings.store import CrashStore
from stepfuzz.fuzz.harness.confirm import RootCauses
from stepfuzz.fuzz.harness.workers import WorkerStats, rss_kb
from stepfuzz.fuzz.inputs import generate as G
from stepfuzz.fuzz.inputs.encoding import MAX_STEPS_BOUND, NotACase, decode_input, encode
from stepfuzz.fuzz.inputs.mutate import FRESH_SHARE, crossover, mutate_case

BATCH = 32                 # cases per batch: a VM's unit of work (and what a restart retries)
QUEUED_PER_WORKER = 2      # batches waiting per worker, so a VM never waits for the host
BOOT_TRIES = 3             # boots in a row that may fail before the campaign gives up
CRASH_TRIES = 2            # VMs a case may kill before it is a finding
STOP_GRACE_S = 60.0        # after a stop request, unfinished batches are dropped (their inputs are not lost: they were never kept)


@dataclass
class KernelConfig:
    kernel: str
    seconds: float | None = None
    runs: int | None = None           # stop after this many cases run
    jobs: int = 1
    corpus: Path = Path("corpus")
    crashes: Path = Path("crashes")
    seed: int | None = None
    max_steps: int = MAX_STEPS_BOUND
    batch: int = BATCH
    boot_timeout: float = realvm.BOOT_TIMEOUT
    cache: str | None = None
    quiet: bool = False


# ---------------------------------------------------------------- workers: one VM each

@dataclass
class Job:
    number: int
    cases: list[tuple[int, Case]]


class VmWorker(threading.Thread):
    """Runs batches in one long-lived VM, restarting it when it dies.  The
    VM is started from this thread and dies with it, even by SIGKILL of the
    campaign (oracle.realkvm.vm._die_with_parent)."""

    def __init__(self, index: int, kernel: kernels.Kernel | None, cfg: KernelConfig,
                 todo: queue.Queue, done: queue.Queue):
        super().__init__(name=f"vm{index}", daemon=True)
        self.index, self.kernel, self.cfg, self.todo, self.done = index, kernel, cfg, todo, done
        self.session: realvm.Session | None = None
        self.boots = self.restarts = self.boot_failures = 0
        self.boot_seconds = 0.0
        self.time = Counter()       # seconds: batch (as the host waits), and batch.TIMING's
        self.failures: list[str] = []   # why each VM died (the campaign says so as it happens)
        self.fatal = ""

    def run(self) -> None:
        try:
            while True:
                job = self.todo.get()
                if job is None:
                    break
                self.done.put((self, job, self.run_job(job)))
                if self.fatal:
                    break
        except Exception as e:            # a bug of the host side: say so, never hang the campaign
            self.fatal = f"worker {self.name}: {type(e).__name__}: {e}"
            self.done.put((self, None, {}))
        finally:
            if self.session is not None:
                self.session.close()

    def _ensure(self) -> bool:
        if self.session is not None and self.session.alive:
            return True
        if self.session is not None:
            self.session.close()
        self.session = None
        failure: realvm.VmFailure | None = None
        for _ in range(BOOT_TRIES):
            s = realvm.Session(self.kernel, kernels_root(self.cfg), self.cfg.boot_timeout)
            try:
                s.start()
            except realvm.VmFailure as e:
                self.boot_failures += 1
                self.failures.append(f"did not boot: {e}")
                failure = e
                continue
            self.session = s
            self.boots += 1
            self.boot_seconds += s.boot_seconds or 0.0
            return True
        self.fatal = f"the kernel did not boot {BOOT_TRIES} times in a row: {failure}"
        return False

    def run_job(self, job: Job) -> dict[int, RealTrace]:
        """The traces of a batch's cases, whatever happens to the VMs."""
        out: dict[int, RealTrace] = {}
        kills: Counter = Counter()
        pending = list(job.cases)
        while pending:
            if not self._ensure():
                return out
            s = self.session
            assert s is not None
            t0 = time.monotonic()
            traces, problem = s.run(pending)
            self.time["batch"] += time.monotonic() - t0
            self.time.update(s.parser.timing)
            out.update(traces)
            if not problem:
                break
            # the VM died: restart it and retry from the first unfinished case;
            # the one it died on is a finding once it has killed CRASH_TRIES VMs
            self.restarts += 1
            left = [(i, c) for i, c in pending if i not in traces]
            suspect = s.parser.current if s.parser.current is not None else left[0][0]
            console = s.con.tail_text() if s.con else ""
            kept = self._keep_death(problem, console, dict(pending)[suspect])
            self.failures.append(f"{problem}: {last_line(console, 'no console')}; {kept}")
            started = s.parser.traces.get(suspect)
            s.close()
            self.session = None
            kills[suspect] += 1
            if kills[suspect] >= CRASH_TRIES:
                out[suspect] = realvm.unfinished(started, str(suspect), problem, console)
                left = [(i, c) for i, c in left if i != suspect]
            pending = left
        return out


    def _keep_death(self, problem: str, console: str, case: Case) -> str:
        """The console's last lines and the case that was running when a VM
        died, under <crashes>/vm-deaths/: nothing about a death is lost, even
        one the retry does not repeat."""
        d = self.cfg.crashes / "vm-deaths"
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{self.name}-{self.restarts}"
        try:
            d.mkdir(exist_ok=True)
            write_atomic(d / f"{name}.json", json.dumps(case.with_words().to_json(), indent=2) + "\n")
            write_atomic(d / f"{name}.txt", f"{problem}\n\nconsole (last lines):\n{console}\n")
        except OutputError as e:
            return f"not kept: {e}"
        return f"kept in {d / name}.*"


def kernels_root(cfg: KernelConfig) -> Path:
    return cache_root(cfg.cache)


# ---------------------------------------------------------------- guidance

def behaviours(real: RealTrace, verdict: str) -> set[int]:
    """What a real trace did, as features: each kind of stop (its syndrome
    class, steps, ISV and the exits before it), each pair of consecutive
    kinds, the ending and the verdict."""
    keys = {f"end|{real.end}", f"verdict|{verdict}"}
    prev = "start"
    for s in real.stops:
        steps = s.steps if 0 <= s.steps <= 2 else (3 if s.steps > 2 else -1)
        k = f"{s.ec}|{steps}|{s.isv}|{'+'.join(sorted({e.kind for e in s.exits}))}"
        keys.add(k)
        keys.add(f"{prev}>{k}")
        prev = k
    keys.add(f"{prev}>end")
    return {zlib.crc32(k.encode()) for k in keys}


class Corpus:
    """The campaign's inputs: files of the corpus directory (case JSON or
    the fuzzing encoding, as in-process campaigns keep them) and the ones
    this campaign adds."""

    def __init__(self, root: Path, warn):
        self.root = root
        self.cases: list[Case] = []
        self.skipped = 0
        for p in sorted(root.rglob("*")):
            if not p.is_file() or p.name.startswith("."):
                continue
            try:
                self.cases.append(decode_input(p.read_bytes()))
            except (OSError, NotACase) as e:
                self.skipped += 1
                warn(f"stepfuzz: warning: {p}: not an input ({e}); skipped, left in place")
        self.loaded = len(self.cases)

    def add(self, case: Case) -> None:
        data = encode(case)
        write_atomic(self.root / hashlib.sha1(data).hexdigest(), data)
        self.cases.append(case)

    def __len__(self) -> int:
        return len(self.cases)


class Inputs:
    """The stream of cases: the corpus first (to learn what it already
    covers), then mutations of corpus entries and fresh generated cases."""

    def __init__(self, corpus: Corpus, rng: random.Random, max_steps: int):
        self.corpus, self.rng, self.max_steps = corpus, rng, max_steps
        self.replay = list(corpus.cases)

    def next(self) -> Case:
        rng = self.rng
        if self.replay:
            case = self.replay.pop(0)
        elif not self.corpus.cases or rng.random() < FRESH_SHARE:
            case = G.generate(rng)
        else:
            case = mutate_case(rng, rng.choice(self.corpus.cases))
            if rng.random() < 0.1:                  # a crossover now and then
                case = crossover(rng, case, rng.choice(self.corpus.cases))
            try:                                    # what the fuzzing decoder makes valid, as in-process
                case = decode_input(encode(case))
            except NotACase:
                case = G.generate(rng)
        return case.bounded(self.max_steps)


# ---------------------------------------------------------------- the campaign

class Tally:
    """What the campaign has seen, for the status line, stats.jsonl and the summary."""

    def __init__(self) -> None:
        self.cases = 0
        self.statuses: Counter = Counter()       # identical, differs, model-only, error
        self.verdicts: Counter = Counter()       # agrees, confirmed, model-gap, new-bug-candidate, model-only
        self.not_sent: Counter = Counter()       # why generated cases were not sent
        self.errors: Counter = Counter()         # how the failed ones ended
        self.host_s = 0.0                        # generating, running the models, judging (the main thread)


def _crash_result(case: Case, log: ExecLog, era: Era, real: RealTrace, ref) -> Result:
    """A case that killed the VM every time, as a finding of its own."""
    problem = real.end.removeprefix("error:")
    d = Divergence(era.id, DivergenceKind.OUTCOME, len(real.stops), f"vm-{problem}", None, None,
                   detail=f"the VM died ({problem}) every time it ran this case")
    return Result(case, era, log, ref, Trace(list(real.stops), real.end, real.detail), d)


def run(cfg: KernelConfig) -> int:
    """Run a campaign on a real kernel; CampaignError if it cannot start."""
    say = (lambda *a: None) if cfg.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    try:
        kernel = kernels.target(cfg.kernel, kernels_root(cfg), native=realvm.native())
        realvm.check_tools(kernel)
    except RealKvmError as e:
        raise CampaignError(str(e)) from None
    era_id = kernels.era_of(kernel)
    if era_id is None:
        raise CampaignError(f"--kernel {cfg.kernel}: cannot tell its version, so not which era model stands for it")
    era = select(era_id)[0]
    lock = open_campaign(cfg.corpus, cfg.crashes)
    try:
        return _run(cfg, kernel, era, say)
    except OutputError as e:
        raise CampaignError(str(e)) from None
    finally:
        lock.close()


def _run(cfg: KernelConfig, kernel: kernels.Kernel | None, era: Era, say) -> int:
    seed = new_seed(cfg.seed)
    mark = kernel.mark() if kernel is not None else {"name": "host", "version": "", "release": "", "sha256": "host"}
    name = f"{mark['name']} (Linux {mark['version']})" if kernel is not None else "this host's KVM"
    corpus = Corpus(cfg.corpus, say)
    known = sum(1 for _ in crash_dirs(cfg.crashes))
    started = time.time()
    say(f"stepfuzz: seed {cfg.seed if cfg.seed is not None else seed} (reuse with --seed {seed}); kernel {name}, "
        f"era {era.id}; {cfg.jobs} VM(s), batches of {cfg.batch}; corpus {cfg.corpus} ({corpus.loaded} entries"
        + (f", {corpus.skipped} skipped" if corpus.skipped else "") + f"); crashes {cfg.crashes} ({known} known)")
    write_atomic(cfg.crashes / "campaign.json", json.dumps(
        {**{k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
         "eras": era.id, "kernel_mark": mark, "seed": seed, "started": started, "started_iso": now_iso(),
         "pid": os.getpid()}, indent=2))
    store = CrashStore(cfg.crashes, worker=f"kernel-{mark['name']}", started=started, target=mark)
    progress = WorkerStats(cfg.crashes, started)
    inputs = Inputs(corpus, random.Random(seed), cfg.max_steps)
    tally = Tally()
    seen: set[int] = set()
    confirming: dict[str, int] = {}          # root signature of a verdict not yet seen twice -> sightings
    roots = RootCauses()                     # attribution, once per per-era signature

    todo: queue.Queue = queue.Queue()
    done: queue.Queue = queue.Queue()
    workers = [VmWorker(i, kernel, cfg, todo, done) for i in range(cfg.jobs)]
    for w in workers:
        w.start()

    stopping: list[float] = []                # when a stop was asked for
    old = {s: signal.signal(s, lambda _s, _f: stopping.append(time.monotonic())) for s in (signal.SIGINT, signal.SIGTERM)}
    deadline = started + cfg.seconds if cfg.seconds else None
    jobs: dict[int, tuple[Job, dict[int, tuple[Case, ExecLog]]]] = {}
    next_id = number = 0
    retry: list[Case] = []                      # cases to run again before a verdict is kept
    # generated cases waiting for a batch, by needs_second_cpu: cases with a
    # `preempt` go in batches of their own, as the runner brings the guest's
    # second CPU online for such a batch only
    held: dict[bool, dict[int, tuple[Case, ExecLog]]] = {False: {}, True: {}}
    stats_path = cfg.crashes / "stats.jsonl"
    next_stats = time.time()
    recent: list[tuple[float, int]] = []
    tty = sys.stderr.isatty() and not cfg.quiet
    fatal = ""

    def runs_left() -> int | None:
        """Cases still to send under --runs (None: no bound)."""
        return None if cfg.runs is None else (cfg.runs - tally.cases - sum(map(len, held.values()))
                                              - sum(len(j.cases) for j, _ in jobs.values()))

    def want_more() -> bool:
        if stopping or fatal or (deadline and time.time() >= deadline):
            return False
        left = runs_left()
        return left is None or left > 0 or any(held.values())

    def build() -> Job | None:
        nonlocal next_id, number
        tries = 0
        while runs_left() != 0 and all(len(h) < cfg.batch for h in held.values()) and tries < 8 * cfg.batch:
            tries += 1
            case = retry.pop() if retry else inputs.next()
            log = execute(case)
            why = skip_reason(case, log, era)
            if why is not None:
                tally.not_sent[why.end] += 1
                continue
            held[needs_second_cpu(case)][next_id] = (case, log)
            next_id += 1
        kind = next((k for k in (True, False) if len(held[k]) >= cfg.batch), None)
        if kind is None:
            # no full batch: the ordinary cases go as they are; the two-CPU
            # ones wait for more, unless no more will come (--runs reached)
            kind = False if held[False] else True if held[True] and runs_left() == 0 else None
        if kind is None:
            return None
        cases, held[kind] = held[kind], {}
        number += 1
        return Job(number, [(i, c) for i, (c, _) in cases.items()]), cases

    def judge_one(case: Case, log: ExecLog, real: RealTrace) -> None:
        infer_steps(real, log)
        tally.cases += 1
        progress.execs = tally.cases
        c = compare_one(f"#{tally.cases}", case, real, era, log)
        tally.statuses[c.status] += 1
        if c.status == "error":
            tally.errors[f"{real.end}: {real.detail}"[:120]] += 1
            if real.detail == realvm.UNFINISHED:
                r = _crash_result(case, log, era, real, reference(log))
                root = root_of_vm_death(r, mark["version"] or "host")
                _keep(r, root, f"the VM died: {real.end}\nconsole (last lines):\n  "
                      + real.console.replace("\n", "\n  "), confirmed=True)
            return
        v = judge(c)
        if v is None:
            return
        tally.verdicts[v.verdict] += 1
        news = behaviours(real, v.verdict) - seen
        if news:
            seen.update(news)
            corpus.add(case)
        if v.verdict not in (CONFIRMED, MODEL_GAP, NEW_BUG):
            return
        root = root_of_verdict(v, mark["version"] or "host", roots.of)
        result = v.model if v.verdict == CONFIRMED or v.kernel.divergence is None else v.kernel
        extra = (f"Linux {mark['version']} showed what era {era.id}'s model predicts (confirmed on the kernel)"
                 if v.verdict == CONFIRMED else
                 model_vs_real_table(case, "case.json", v.model.model, real, c.difference, mark["name"], era.id))
        # a real kernel's trace is not a pure function of the case (QEMU, timing):
        # what no model predicts is kept once the case has shown it twice
        _keep(result, root, extra, confirmed=v.verdict == CONFIRMED, case=case)

    def _keep(result: Result, root, extra: str, confirmed: bool, case: Case | None = None) -> None:
        rid = store.id_of(root.signature)
        if not confirmed and not store.knows(rid):
            n = confirming[root.signature] = confirming.get(root.signature, 0) + 1
            if n < 2:
                if case is not None:
                    retry.append(case)
                return
        if store.record(result, root, tally.cases, extra):
            say(("\n" if tty else "") + f"stepfuzz: new on {mark['name']}: {root.signature}  [{store.dir(rid).path}]")

    def snapshot() -> dict:
        now = time.time()
        nonlocal recent
        recent = [(t, e) for t, e in recent if now - t <= 30] + [(now, tally.cases)]
        t0, e0 = recent[0]
        rate = (tally.cases - e0) / (now - t0) if now - t0 >= 1 else 0.0
        roots = sum(1 for _ in crash_dirs(cfg.crashes))
        return {"time": now_iso(), "t": round(now, 3), "elapsed_s": round(now - started, 1),
                "execs": tally.cases, "execs_per_s": round(rate, 1), "corpus": len(corpus),
                "cov": len(seen), "ft": len(seen), "rss_mb": round(rss_kb() / 1024, 1),
                "workers": sum(w.is_alive() for w in workers), "unique": roots, "roots": roots,
                "by_era": {era.id: roots} if roots else {}, "kernel": mark,
                "restarts": sum(w.restarts for w in workers), "boots": sum(w.boots for w in workers),
                "boot_s": round(sum(w.boot_seconds for w in workers), 1),
                "statuses": dict(tally.statuses), "verdicts": dict(tally.verdicts),
                "not_sent": sum(tally.not_sent.values()), "host_s": round(tally.host_s, 1),
                **{f"vm_{k}_s": round(sum(w.time[k] for w in workers), 1)
                   for k in ("batch", *TIMING)}}

    try:
        while True:
            while want_more() and len(jobs) < QUEUED_PER_WORKER * cfg.jobs:
                t0 = time.monotonic()
                built = build()
                tally.host_s += time.monotonic() - t0
                if built is None:
                    break
                job, cases = built
                jobs[job.number] = (job, cases)
                todo.put(job)
            if not jobs:
                break
            try:
                worker, job, traces = done.get(timeout=1.0)
            except queue.Empty:
                job = None
                worker = None
            if worker is not None and worker.fatal:
                fatal = fatal or worker.fatal
            if worker is not None:
                while worker.failures:
                    why = worker.failures.pop(0)
                    say(f"stepfuzz: {worker.name}: {why}; trying again" if why.startswith("did not boot") else
                        f"stepfuzz: {worker.name} restarted: the VM died ({why}); its batch goes on in a new one")
            if job is not None:
                _, cases = jobs.pop(job.number)
                t0 = time.monotonic()
                for i, (case, log) in cases.items():
                    if i in traces:
                        judge_one(case, log, traces[i])
                tally.host_s += time.monotonic() - t0
            if fatal and not any(w.is_alive() and not w.fatal for w in workers):
                break
            if stopping and time.monotonic() - stopping[0] > STOP_GRACE_S:
                break
            if time.time() >= next_stats:
                next_stats = time.time() + STATS_EVERY_S
                snap = snapshot()
                _append(stats_path, snap)
                progress.write(snap["unique"])
                store.flush()
                if not tty:
                    say(_status(snap))
            if tty:
                print("\r" + _status(snapshot()), end="", file=sys.stderr, flush=True)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for _ in workers:
            todo.put(None)
        for w in workers:
            w.join(timeout=realvm.GRACE + 5)
        store.flush()
    snap = snapshot()
    snap["final"] = True
    _append(stats_path, snap)
    progress.write(snap["unique"], final=True)
    if tty:
        print(file=sys.stderr)
    summary(cfg, snap, started, say)
    say(agreement(tally, name, era, snap))
    say(where_time_goes(snap))
    if fatal:
        say(f"stepfuzz: error: {name}: {fatal}")
        return 2
    return 0


def _status(snap: dict) -> str:
    return status_line(snap) + f"  restarts {snap['restarts']}"


def agreement(t: Tally, name: str, era: Era, snap: dict) -> str:
    """The campaign's model-vs-real figure, one line."""
    compared = t.statuses["identical"] + t.statuses["differs"]
    v = t.verdicts
    return (f"stepfuzz: {t.cases:,} cases on {name} vs era {era.id}: {t.statuses['identical']:,}/{compared:,} "
            f"identical stop for stop ({v[CONFIRMED]:,} of them a divergence the model predicts)"
            f", {t.statuses['model-only']:,} model-only, {v[MODEL_GAP]:,} model gap(s), "
            f"{v[NEW_BUG]:,} new-bug candidate(s), {t.statuses['error']:,} failed; "
            f"{sum(t.not_sent.values()):,} generated cases not sent (not reproducible there); "
            f"{snap['boots']} boot(s) ({snap['boot_s']:.0f} s), {snap['restarts']} restart(s)"
            + "".join(f"\n  failed x{n}: {why}" for why, n in t.errors.most_common(5)))


# What a batch's round trip is spent on (runner.c `done`): the stages of a
# case on the runner's clock, and the channel, the rest of the host's wait.
STAGES = {"vm_setup": "a new VM per case, its memory and registers", "prefault": "the prefault prologue",
          "stepping": "stepping", "vm_teardown": "tearing the VM down",
          "channel": "the serial console, both ways"}


def time_shares(snap: dict) -> dict[str, float]:
    """Each stage's share of the VMs' batch time, and inside KVM_RUN's
    (which overlaps the prologue and stepping); {} if no batch ran."""
    batch = snap.get("vm_batch_s", 0)
    if batch <= 0:
        return {}
    shares = {k: snap.get(f"vm_{k}_s", 0) / batch for k in STAGES if k != "channel"}
    shares["channel"] = max(0.0, batch - snap.get("vm_guest_cases_s", 0)) / batch
    shares["kvm_run"] = snap.get("vm_kvm_run_s", 0) / batch
    return {k: round(v, 3) for k, v in shares.items()}


def where_time_goes(snap: dict) -> str:
    """What dominates a campaign on a real kernel, one line."""
    shares = time_shares(snap)
    if not shares:
        return "stepfuzz: no batch ran"
    parts = ", ".join(f"{what} {100 * shares[k]:.0f}%" for k, what in STAGES.items())
    return (f"stepfuzz: VM time {snap['vm_batch_s']:.0f} s: {parts}; inside KVM_RUN {100 * shares['kvm_run']:.0f}% "
            f"(the guest and KVM under QEMU TCG, in the prologue and stepping); host side {snap['host_s']:.0f} s "
            f"(generating, the models, judging), {snap['boot_s']:.0f} s booting")
