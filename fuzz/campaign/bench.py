"""`stepfuzz bench`: what a differential check costs next to raw Unicorn.

All variants run side by side in one process, interleaved case by case, on
the same generated cases (16, 64 and 256 instructions, about 10 % meeting
the hypervisor, a few events), each case's best time of five rounds:

    raw        Unicorn runs the same fresh code once in one emu_start: every
               region plain RAM, no hooks, translation included; instructions
               that trap to KVM (HVC, debug registers) run as NOPs: without
               hooks HVC stops Unicorn, and QEMU flushes every translation
               when a debug register is written
    reference  the guest CPU (Unicorn + hooks) and the ideal trace
    ref+1 era  plus one era model (6.1) and the comparison: oracle.run.check
               as campaigns call it (each model stops at its first divergence,
               which is all a divergence needs)
    ref+all    the same with every era model

Then a real single-worker campaign runs for a while on default settings
for executions per second and peak RSS.
"""
from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from unicorn import UC_ARCH_ARM64, UC_MODE_ARM, Uc, UcError

from stepfuzz.oracle.case import Case
from stepfuzz.oracle.guest import REG_IDS, _Regs, execute, forget_code, program_bytes
from stepfuzz.oracle.isa import InsnClass, decode
from stepfuzz.oracle.kvm.eras import ERAS, select
from stepfuzz.oracle.reference import reference
from stepfuzz.oracle.run import check
from stepfuzz.oracle.vocabulary import Outcome

from stepfuzz.fuzz.inputs import generate as G
from stepfuzz.fuzz.campaign.realkernel import STAGES, time_shares
from stepfuzz.fuzz.campaign.supervisor import STEPFUZZ_COMMAND

SIZES = (16, 64, 256)


def bench_cases(n_insns: int, count: int, seed: int) -> list[Case]:
    """Programs with ~10 % exits and forward control flow only, so that the
    raw run (which has no step bound) always terminates, and that the guest
    runs to their end, so every variant does the whole program's work."""
    rnd = random.Random(seed)
    cfg = G.GenConfig(min_insns=n_insns, max_insns=n_insns, max_steps=4 * n_insns + 64, max_events=3)
    out = []
    while len(out) < count:
        words: list[int] = []
        while len(words) < n_insns:
            r = rnd.random()
            if r < 0.07:
                snippet = G.exit_snippet(rnd)
            elif r < 0.12:
                skip = G.alu(rnd) + G.alu(rnd)
                snippet = [G.I.b(len(skip) + 1)] + skip          # forward branch
            elif r < 0.14:
                snippet = [G.I.bl(2), G.I.b(2), G.I.ret()]       # call and return
            else:
                snippet = G.alu(rnd)
            if len(words) + len(snippet) > n_insns:
                snippet = G.alu(rnd)          # no branch may leave the program
            words += snippet
        case = replace(G.generate(rnd, cfg), words=tuple(words), events=G.events(rnd, len(words), cfg))
        if execute(case).outcome == Outcome.END:       # not cut short (an access with no syndrome ends a run)
            out.append(case)
    return out


class Raw:
    """The floor: one Unicorn, all memory plain RAM, no hooks."""

    def __init__(self, cases: list[Case]):
        self.uc = Uc(UC_ARCH_ARM64, UC_MODE_ARM)
        self.regs = _Regs(self.uc)          # the same fast register access the guest CPU uses
        for r in cases[0].memory:
            self.uc.mem_map(r.base, r.size)
        self.ctx = self.uc.context_save()
        # the words, with the NOPs in, prepared before any timing
        self.code = {id(c): program_bytes(replace(c, words=tuple(G.I.NOP if decode(w).kind in (InsnClass.HVC, InsnClass.DBGREG) else w
                                                                   for w in c.words)))
                     for c in cases}

    def run(self, case: Case) -> None:
        uc = self.uc
        uc.context_restore(self.ctx)
        for name, value in case.regs:
            self.regs[REG_IDS[name]] = value
        uc.mem_write(case.base, self.code[id(case)])
        uc.ctl_remove_cache(case.base, case.end + 4)   # fresh code: translated again (the cheapest way)
        try:
            uc.emu_start(case.base, case.end)
        except UcError:
            pass                      # (an exception ends the one run; rare in these programs)


def _variants(raw: Raw):
    era = [ERAS["6.1"]]
    all_eras = select("all")

    # Each variant runs its case as fresh code, as the raw run does and as a
    # campaign's inputs are (the guest CPU keeps the translations of a case
    # that runs again).
    def reference_only(c):
        forget_code()
        reference(execute(c))

    def one_era(c):
        forget_code()
        check(c, era, first_divergence_only=True)

    def every_era(c):
        forget_code()
        check(c, all_eras, first_divergence_only=True)

    return {"raw": raw.run, "reference": reference_only, "ref+1 era": one_era, "ref+all eras": every_era}


def measure(per_size: int = 60, rounds: int = 5, seed: int = 1) -> dict[int, dict[str, float]]:
    """Microseconds per case, per size and variant: each case's best of
    `rounds` (the machine's noise only ever adds time), averaged over cases."""
    results: dict[int, dict[str, float]] = {}
    for n in SIZES:
        cases = bench_cases(n, per_size, seed + n)
        raw = Raw(cases)
        variants = _variants(raw)
        best = {k: [float("inf")] * len(cases) for k in variants}
        for c in cases:                       # warm-up: Python caches, steady states
            for f in variants.values():
                f(c)
        for _ in range(rounds):
            for i, c in enumerate(cases):
                for name, f in variants.items():
                    t = time.perf_counter()
                    f(c)
                    best[name][i] = min(best[name][i], time.perf_counter() - t)
        results[n] = {k: statistics.mean(v) * 1e6 for k, v in best.items()}
    return results


def campaign_rate(seconds: float, *flags: str) -> tuple[float, float]:
    """Executions per second and peak worker RSS of a real campaign (default settings plus `flags`)."""
    with tempfile.TemporaryDirectory(prefix="stepfuzz-bench-") as tmp:
        crashes = Path(tmp) / "crashes"
        done = subprocess.run([*STEPFUZZ_COMMAND, "fuzz", "--time", f"{int(seconds)}s", "--seed", "1",
                               "--corpus", str(Path(tmp) / "corpus"), "--crashes", str(crashes), *flags],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
        workers = [json.loads(p.read_text()) for p in (crashes / ".workers").glob("*.json")]
        if not workers or not sum(w["execs"] for w in workers):
            tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"the benchmark campaign ran nothing (exit {done.returncode}): {tail[0]}")
        records = [json.loads(l) for l in (crashes / "stats.jsonl").read_text().splitlines()]
        execs = sum(w["execs"] for w in workers)
        spent = max(w["updated"] - w["begun"] for w in workers)
        rss = max([r["rss_mb"] for r in records] + [w["rss_kb"] / 1024 for w in workers])
        return execs / spent, rss


def machine() -> str:
    """The CPU the figures were measured on: the ratios carry over to another
    machine, executions per second do not (the same code ran a campaign at
    about 440/s on one 2-core machine and 1130/s on another)."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def run(seconds: float = 30.0) -> dict:
    t = measure()
    out = {"machine": machine(), "us_per_case": {str(n): {k: round(v, 1) for k, v in row.items()} for n, row in t.items()}}
    raw64 = t[64]["raw"]
    out["diff_vs_raw"] = round(t[64]["ref+1 era"] / raw64, 2)
    out["all_eras_vs_raw"] = round(t[64]["ref+all eras"] / raw64, 2)
    out["scaling_256_64"] = round(t[256]["ref+1 era"] / t[64]["ref+1 era"], 2)
    rate, rss = campaign_rate(seconds)
    out["fuzz_execs_per_s"] = round(rate, 1)
    out["rss_mb"] = round(rss, 1)
    rate, _ = campaign_rate(seconds, "--code-coverage")
    out["fuzz_execs_per_s_code_coverage"] = round(rate, 1)
    return out


def table(r: dict) -> str:
    lines = [f"machine: {r['machine']}", "", "| instructions | raw Unicorn | reference | ref + 1 era | ref + all eras |", "|---|---|---|---|---|"]
    for n, row in r["us_per_case"].items():
        raw = row["raw"]
        cells = [f"{row[k]:.0f} µs ({row[k] / raw:.1f}x)" for k in ("raw", "reference", "ref+1 era", "ref+all eras")]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", f"diff_vs_raw (ref + 1 era, 64 insns): {r['diff_vs_raw']}",
              f"all_eras_vs_raw (64 insns): {r['all_eras_vs_raw']}",
              f"scaling_256_64 (ref + 1 era): {r['scaling_256_64']}",
              f"fuzz_execs_per_s (default campaign, 1 worker): {r['fuzz_execs_per_s']}",
              f"fuzz_execs_per_s_code_coverage (--code-coverage): {r['fuzz_execs_per_s_code_coverage']}",
              f"rss_mb (peak, campaign worker): {r['rss_mb']}"]
    return "\n".join(lines)


# ---------------------------------------------------------------- real kernels

def kernel_rate(kernel: str, seconds: float, jobs: int) -> dict:
    """A campaign on a real kernel, timed: cases per minute with the boots
    counted and without (each VM boots once, in parallel with the others),
    and the shares of a batch's round trip (stepfuzz.fuzz.campaign.realkernel)."""
    with tempfile.TemporaryDirectory(prefix="stepfuzz-bench-") as tmp:
        crashes = Path(tmp) / "crashes"
        done = subprocess.run([*STEPFUZZ_COMMAND, "fuzz", "--kernel", kernel, "--time", f"{int(seconds)}s",
                               "--jobs", str(jobs), "--seed", "1", "--corpus", str(Path(tmp) / "corpus"),
                               "--crashes", str(crashes)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, check=False)
        try:
            last = json.loads((crashes / "stats.jsonl").read_text().splitlines()[-1])
        except (OSError, ValueError, IndexError):
            last = {}
        if done.returncode != 0 or not last.get("execs"):
            tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"the campaign on {kernel} ran nothing (exit {done.returncode}): {tail[0]}")
    elapsed, cases, boot = last["elapsed_s"], last["execs"], last["boot_s"] / max(1, last["boots"])
    return {"kernel": kernel, "jobs": jobs, "cases": cases, "seconds": elapsed,
            "cases_per_min": round(60 * cases / elapsed, 1),
            "cases_per_min_boot_excluded": round(60 * cases / max(1e-9, elapsed - boot), 1),
            "boot_s": round(boot, 1), "ms_per_case_per_vm": round(1000 * last["vm_batch_s"] / max(1, cases), 1),
            **{f"share_{k}": v for k, v in time_shares(last).items()},
            "host_s": last["host_s"]}


def kernel_table(r: dict) -> str:
    return "\n".join([
        f"machine: {r['machine']}",
        f"kernel {r['kernel']}, {r['jobs']} VM(s), {r['seconds']:.0f} s: {r['cases']:,} cases",
        f"cases_per_min (boot included): {r['cases_per_min']:,.0f}",
        f"cases_per_min_boot_excluded: {r['cases_per_min_boot_excluded']:,.0f} (a boot takes {r['boot_s']} s)",
        f"a case takes {r['ms_per_case_per_vm']} ms of one VM's time: "
        + ", ".join(f"{what} {100 * r['share_' + k]:.0f}%" for k, what in STAGES.items())
        + f"; inside KVM_RUN {100 * r['share_kvm_run']:.0f}% (the guest and KVM under QEMU TCG)",
        f"host side (generating, models, judging; overlaps the VMs): {r['host_s']:.0f} s"])
