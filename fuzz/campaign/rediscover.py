"""`stepfuzz rediscover`: time to first find of the known bug classes, from an
empty corpus, with coverage feedback (a real atheris campaign) and without
(the same generator, fresh cases, no feedback).  Medians over seeds."""
from __future__ import annotations

import random
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from stepfuzz.oracle.kvm.eras import select
from stepfuzz.oracle.run import check

from stepfuzz.fuzz.findings.crashdir import UnreadableRecord, scan
from stepfuzz.fuzz.findings.store import read_json
from stepfuzz.fuzz.inputs.encoding import MAX_STEPS_BOUND
from stepfuzz.fuzz.findings.rootcause import root_of
from stepfuzz.fuzz.harness.confirm import RootCauses
from stepfuzz.fuzz.harness.workers import read_workers
from stepfuzz.fuzz.inputs.generate import generate
from stepfuzz.fuzz.campaign.supervisor import STEPFUZZ_COMMAND

# class -> its root cause signature (tests/test_attribution.py checks that each
# is what attribution makes of the corpus/known case named after it)
CLASSES = {"4.15 zero-step after a stage-2 fault": "v5.0:bd7d95cafb49/zero-step",
           "5.0 skipped instruction after immediate_exit": "v5.3:2113c5f62b74/skipped-instruction",
           "5.10 multi-step after emulation": "v5.11:cdb5e02ed133/multi-step",
           "5.11 multi-step after an exit in active-pending": "v6.1:34fbdee086cf+370531d1e95b/multi-step",
           "6.1 multi-step after immediate_exit or a signal": "v6.14:2ca3f03bf524/multi-step",
           "arch (any: an oracle bug)": "arch"}
ERAS = "4.15,5.0,5.10,5.11,6.1,arch"
TARGETS = [c for c in CLASSES if not c.startswith("arch")]


def _classes_of(root: str, eras) -> list[str]:
    return [c for c, want in CLASSES.items() if root == want or (want == "arch" and "arch" in eras)]


def with_feedback(seed: int, limit_s: float, log=lambda m: None) -> dict[str, tuple[float, int]]:
    """A single-process campaign on an empty corpus, stopped once every target
    is found.  A finding whose record cannot be read counts as not found, and
    is logged once."""
    warned: set[Path] = set()

    def warn(e: UnreadableRecord) -> None:
        if e.path not in warned:
            warned.add(e.path)
            log(f"stepfuzz: warning: {e}")
    with tempfile.TemporaryDirectory(prefix="stepfuzz-rediscover-") as tmp:
        crashes = Path(tmp) / "crashes"
        proc = subprocess.Popen([*STEPFUZZ_COMMAND, "fuzz", "--era", ERAS, "--seed", str(seed),
                                 "--time", f"{int(limit_s)}s", "--corpus", str(Path(tmp) / "corpus"),
                                 "--crashes", str(crashes)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        found: dict[str, float] = {}
        while proc.poll() is None:
            time.sleep(0.5)
            found = _found(crashes, warn)
            if all(t in found for t in TARGETS):
                proc.send_signal(signal.SIGINT)
                break
        proc.wait(timeout=60)
        return _found(crashes, warn)


def _found(crashes: Path, warn=lambda e: None) -> dict[str, tuple[float, int]]:
    """class -> (seconds since the harness started, executions) at the first
    find; warn(UnreadableRecord) for each finding that cannot be read."""
    ready = min((w["begun"] for w in read_workers(crashes) if w["begun"]), default=None)
    camp = read_json(crashes / "campaign.json") or {}
    startup = (ready - camp["started"]) if ready and camp else 0.0
    out: dict[str, tuple[float, int]] = {}
    found = scan(crashes)
    for e in found.unreadable:
        warn(e)
    for f in found:
        first = f.record.first_found
        at = (max(0.0, first.elapsed_s - startup), first.execs)
        root = root_of(f.dir, f.record)
        for c in _classes_of(root["signature"], f.record.eras or [f.record.era]):
            out[c] = min(out.get(c, at), at)
    return out


def without_feedback(seed: int, limit_s: float) -> dict[str, tuple[float, int]]:
    """The generator alone: fresh cases, no mutation, no coverage, each
    checked as the campaign's harness checks an input."""
    rnd = random.Random(seed)
    eras = select(ERAS)
    start = time.perf_counter()
    found: dict[str, tuple[float, int]] = {}
    roots = RootCauses()          # attributed as the harness does, once per per-era signature
    execs = 0
    while time.perf_counter() - start < limit_s and not all(t in found for t in TARGETS):
        execs += 1
        for r in check(generate(rnd).bounded(MAX_STEPS_BOUND), eras, first_divergence_only=True):
            if r.divergence:
                for c in _classes_of(roots.of(r).signature, [r.era.id]):
                    found.setdefault(c, (time.perf_counter() - start, execs))
    return found


def table(seeds: list[int], limit_s: float, log=lambda *a: None) -> str:
    runs = {"feedback": [], "none": []}
    for s in seeds:
        runs["feedback"].append(with_feedback(s, limit_s, log))
        runs["none"].append(without_feedback(s, limit_s))
        log(f"seed {s}: with feedback {runs['feedback'][-1]}; without {runs['none'][-1]}")

    def cell(results: list[dict[str, tuple[float, int]]], c: str) -> str:
        hits = [r[c] for r in results if c in r]
        if c.startswith("arch"):
            return "none found" if not hits else f"FOUND in {len(hits)}/{len(results)} (bug)"
        if len(hits) * 2 <= len(results):
            return f"> {limit_s:.0f} s ({len(hits)}/{len(results)} found)"
        # medians, unfound runs counted as the limit
        missing = len(results) - len(hits)
        secs = statistics.median([h[0] for h in hits] + [limit_s] * missing)
        execs = statistics.median([h[1] for h in hits] + [float("inf")] * missing)
        return f"{secs:.2f} s, {execs:.0f} execs ({len(hits)}/{len(results)})"

    lines = ["| class | with coverage feedback | generator alone |", "|---|---|---|"]
    for c in CLASSES:
        lines.append(f"| {c} | {cell(runs['feedback'], c)} | {cell(runs['none'], c)} |")
    return "\n".join(lines)
