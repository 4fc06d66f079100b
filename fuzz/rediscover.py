"""`stepfuzz rediscover`: time to first find of the known bug classes, from an
empty corpus, with coverage feedback (a real atheris campaign) and without
(the same generator, fresh cases, no feedback).  Medians over seeds."""
from __future__ import annotations

import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from oracle.kvm.eras import select
from oracle.run import check

from .generate import generate

CLASSES = {"4.15 zero-step": "4.15/zero-step/", "5.10 multi-step": "5.10/multi-step/",
           "6.1 multi-step": "6.1/multi-step/", "arch (any: an oracle bug)": "arch/"}
ERAS = "4.15,5.10,6.1,arch"
TARGETS = [c for c in CLASSES if not c.startswith("arch")]


def _class_of(signature: str) -> str | None:
    return next((c for c, prefix in CLASSES.items() if signature.startswith(prefix)), None)


def with_feedback(seed: int, limit_s: float) -> dict[str, float]:
    """A single-process campaign on an empty corpus, stopped once every target is found."""
    with tempfile.TemporaryDirectory(prefix="stepfuzz-rediscover-") as tmp:
        crashes = Path(tmp) / "crashes"
        proc = subprocess.Popen([sys.executable, "-m", "fuzz.cli", "fuzz", "--era", ERAS, "--seed", str(seed),
                                 "--time", f"{int(limit_s)}s", "--corpus", str(Path(tmp) / "corpus"),
                                 "--crashes", str(crashes)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        found: dict[str, float] = {}
        while proc.poll() is None:
            time.sleep(0.5)
            found = _found(crashes)
            if all(t in found for t in TARGETS):
                proc.send_signal(signal.SIGINT)
                break
        proc.wait(timeout=60)
        return _found(crashes)


def _found(crashes: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in crashes.glob("*/divergence.json"):
        try:
            info = json.loads(p.read_text())
        except ValueError:
            continue
        c = _class_of(info["signature"])
        if c:
            out[c] = min(out.get(c, 1e9), info["first_found"]["elapsed_s"])
    return out


def without_feedback(seed: int, limit_s: float) -> dict[str, float]:
    """The generator alone: fresh cases, no mutation, no coverage."""
    rnd = random.Random(seed)
    eras = select(ERAS)
    start = time.perf_counter()
    found: dict[str, float] = {}
    while time.perf_counter() - start < limit_s and not all(t in found for t in TARGETS):
        for r in check(generate(rnd), eras):
            if r.divergence:
                c = _class_of(r.divergence.signature)
                if c and c not in found:
                    found[c] = time.perf_counter() - start
    return found


def table(seeds: list[int], limit_s: float, log=lambda *a: None) -> str:
    runs = {"feedback": [], "none": []}
    for s in seeds:
        runs["feedback"].append(with_feedback(s, limit_s))
        runs["none"].append(without_feedback(s, limit_s))
        log(f"seed {s}: with feedback {runs['feedback'][-1]}; without {runs['none'][-1]}")

    def cell(results: list[dict[str, float]], c: str) -> str:
        times = [r[c] for r in results if c in r]
        if c.startswith("arch"):
            return "none found" if not times else f"FOUND in {len(times)}/{len(results)} (bug)"
        if len(times) * 2 <= len(results):
            return f"> {limit_s:.0f} s ({len(times)}/{len(results)} found)"
        # median with unfound runs counted as the time limit
        med = statistics.median(times + [limit_s] * (len(results) - len(times)))
        return f"{med:.1f} s ({len(times)}/{len(results)})"

    lines = [f"| class | with coverage feedback | generator alone |", "|---|---|---|"]
    for c in CLASSES:
        lines.append(f"| {c} | {cell(runs['feedback'], c)} | {cell(runs['none'], c)} |")
    return "\n".join(lines)
