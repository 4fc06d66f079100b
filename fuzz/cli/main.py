"""The `stepfuzz` command."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from stepfuzz.oracle.case import CaseError, load_case
from stepfuzz.oracle.kvm.eras import ERAS

from stepfuzz.fuzz.cli.common import (EXIT_AGREE, EXIT_BAD, EXIT_DIVERGED, add_all_rows, add_cache, add_era, add_json,
                                      add_max_steps, check_max_steps, eras_arg, existing_dirs, fail,
                                      load_cases, output_dir, output_file, positive_seconds)
from stepfuzz.fuzz.findings.crashdir import OutputError

# ---------------------------------------------------------------- commands

def cmd_run(args: argparse.Namespace) -> int:
    from stepfuzz.oracle.run import check
    from stepfuzz.fuzz.findings.report import result_json, result_table
    eras = eras_arg(args.era)
    cases, bad = load_cases(args.cases)
    diverged = unexpected = 0
    for path, case in cases:
        try:
            results = check(case, eras)
        except Exception as e:           # an oracle failure on this case, not a crash of the command
            print(f"stepfuzz: {path}: cannot run: {type(e).__name__}: {e}", file=sys.stderr)
            bad += 1
            continue
        expect = dict(case.expect)
        for r in results:
            if r.divergence:
                diverged += 1
            want = expect.get(r.era.id)
            got = r.divergence.kind if r.divergence else "agree"
            if want and want != got:
                unexpected += 1
            if args.json:
                line = result_json(r, str(path))
                if want:
                    line["expected"] = want
                print(json.dumps(line))
            else:
                print(result_table(r, str(path), args.all))
                if want:
                    print(f"  expected: {want} -> {'as expected' if want == got else 'UNEXPECTED'}")
                print()
    if not args.json:
        n = len(cases) * len(eras)
        print(f"{len(cases)} case(s) x {len(eras)} era(s): {n - diverged} agree, {diverged} diverge"
              + (f", {unexpected} not as the case expects" if unexpected else "")
              + (f", {bad} could not be run" if bad else ""))
    if bad:
        return EXIT_BAD
    return EXIT_DIVERGED if diverged else EXIT_AGREE


def cmd_case_check(args: argparse.Namespace) -> int:
    cases, bad = load_cases(args.files)
    for path, case in cases:
        print(f"ok  {path}: {len(case.words)} instructions, {len(case.memory)} regions, {len(case.events)} events")
    return EXIT_BAD if bad else EXIT_AGREE


def cmd_fuzz(args: argparse.Namespace) -> int:
    from stepfuzz.fuzz.campaign.supervisor import Config, parse_duration, run
    eras_arg(args.era)
    try:
        seconds = parse_duration(args.time) if args.time is not None else None
    except ValueError as e:
        fail(str(e))
    if args.time is not None and seconds is None:
        fail(f"--time {args.time!r}: not a duration (examples: 90, 30s, 5m, 8h, 1h30m)")
    if seconds is None and args.runs is None:
        seconds = 60.0
    most = 4 * (os.cpu_count() or 1)     # each job is a Python process running every era model
    if not 1 <= args.jobs <= most:
        fail(f"--jobs {args.jobs}: must be 1..{most} (4 per core on this machine)")
    check_max_steps(args.max_steps)
    from stepfuzz.fuzz.campaign.supervisor import CampaignError
    if args.kernel is not None:
        return _fuzz_kernel(args, seconds)
    if args.batch != 32:
        fail("--batch is for campaigns on a real kernel (--kernel)")
    try:
        return run(Config(eras=args.era, seconds=seconds, runs=args.runs, jobs=args.jobs, corpus=Path(args.corpus),
                          crashes=Path(args.crashes), seed=args.seed, max_steps=args.max_steps,
                          code_coverage=args.code_coverage, extra=args.libfuzzer or []))
    except CampaignError as e:
        fail(str(e))


def _fuzz_kernel(args: argparse.Namespace, seconds: float | None) -> int:
    from stepfuzz.fuzz.campaign.realkernel import KernelConfig, run
    from stepfuzz.fuzz.campaign.supervisor import CampaignError
    if args.era != "all" or args.code_coverage or args.libfuzzer:
        fail("--era, --code-coverage and libFuzzer flags are for in-process campaigns: a campaign on a real "
             "kernel compares it with its own era")
    if not 1 <= args.batch <= 1024:
        fail(f"--batch {args.batch}: must be 1..1024")
    try:
        return run(KernelConfig(kernel=args.kernel, seconds=seconds, runs=args.runs, jobs=args.jobs,
                                corpus=Path(args.corpus), crashes=Path(args.crashes), seed=args.seed,
                                max_steps=args.max_steps, batch=args.batch, boot_timeout=args.boot_timeout,
                                cache=args.cache))
    except CampaignError as e:
        fail(str(e))


def cmd_status(args: argparse.Namespace) -> int:
    from stepfuzz.fuzz.campaign.status import status
    (d,) = existing_dirs([args.dir], "campaign")
    s = status(d)
    for e in s.unreadable:
        print(f"stepfuzz: warning: {e}", file=sys.stderr)
    print(s.text)
    return EXIT_AGREE


def cmd_plot(args: argparse.Namespace) -> int:
    from stepfuzz.fuzz.campaign.status import NotACampaign, plot
    d = Path(args.dir)
    out = output_file(args.output if args.output is not None else str(d / "plot.html"))
    try:
        plot(d, out)
    except NotACampaign as e:
        fail(str(e))
    print(out)
    return EXIT_AGREE


def cmd_rediscover(args: argparse.Namespace) -> int:
    from stepfuzz.fuzz.campaign.rediscover import table
    print(table(list(range(1, args.seeds + 1)), args.limit, log=lambda m: print(m, file=sys.stderr)))
    return EXIT_AGREE


def cmd_minimize(args: argparse.Namespace) -> int:
    import time
    from dataclasses import replace

    from stepfuzz.fuzz.findings.crashdir import BadTarget, UnreadableRecord, minimize_jobs, write_atomic
    from stepfuzz.fuzz.findings.minimize import NotDivergent, describe, minimize
    from stepfuzz.fuzz.findings.report import readable
    if args.era and len(eras_arg(args.era)) != 1:
        fail(f"--era {args.era}: name one era (a case is minimized for the divergence of one era)")
    if args.output and Path(args.target).is_dir():
        fail(f"-o {args.output}: a crash directory's findings each go to <id>/minimized.json; -o is for one case")
    try:
        jobs, unreadable = minimize_jobs(Path(args.target), args.era, args.output)
    except (BadTarget, UnreadableRecord) as e:
        fail(str(e))
    status = EXIT_AGREE
    for e in unreadable:
        print(f"stepfuzz: warning: {e}", file=sys.stderr)
        status = EXIT_BAD
    for job in jobs:
        try:
            case = load_case(job.case)
        except CaseError as e:
            print(f"stepfuzz: {e}", file=sys.stderr)
            status = EXIT_BAD
            continue
        if job.era not in ERAS:              # a record of another version: named, the others go on
            print(f"stepfuzz: warning: {job.case.parent / 'divergence.json'}: era {job.era!r} is not one "
                  "this stepfuzz knows", file=sys.stderr)
            status = EXIT_BAD
            continue
        era = ERAS[job.era]
        t = time.perf_counter()
        try:
            small, m = minimize(case, era, log=(lambda s: print(s)) if args.verbose else (lambda s: None),
                                max_seconds=args.max_seconds, max_shrinks=args.max_shrinks, max_checks=args.max_checks)
        except NotDivergent as e:
            print(f"stepfuzz: {job.case}: {e}", file=sys.stderr)
            status = EXIT_BAD
            continue
        small = readable(replace(small, name=f"{m.signature}, minimized" + (f" from: {case.name}" if case.name else "")))
        if job.out.resolve() == job.case.resolve():
            fail(f"{job.out}: is the input; not replaced (give -o another file)")
        if args.output is not None:
            output_file(args.output, (job.case,))
        write_atomic(job.out, small.dumps())
        print(f"{job.label}: {m.signature}: {describe(case)} -> {describe(small)} "
              f"({m.checks} checks, {time.perf_counter() - t:.2f} s"
              + (f"; stopped by {m.stopped}, maybe not minimal" if m.stopped else "") + f") -> {job.out}")
    return status


def cmd_triage(args: argparse.Namespace) -> int:
    from stepfuzz.fuzz.findings.triage import collect, json_lines, markdown, write_html
    (d,) = existing_dirs([args.dir], "crash")
    from stepfuzz.fuzz.findings.on_kernels import NotConfirmable, resolve_kernels, triage_on_kernels
    targets = []
    if args.kernels is not None:
        try:
            targets = resolve_kernels(args.kernels.split(","))    # before reading or booting anything
        except NotConfirmable as e:
            fail(str(e))
    found = collect(d)
    for e in found.unreadable:
        print(f"stepfuzz: warning: {e}", file=sys.stderr)
    rows = found.rows
    if targets:
        try:
            triage_on_kernels(rows, targets)
        except (NotConfirmable, CaseError) as e:
            fail(str(e))
    title = f"stepfuzz triage: {d}"
    if args.html is not None:
        write_html(rows, title, output_file(args.html))
    print(json_lines(rows) if args.json else markdown(rows, title), end="")
    return EXIT_AGREE


def cmd_bench(args: argparse.Namespace) -> int:
    from stepfuzz.fuzz.campaign.bench import kernel_rate, kernel_table, machine, run, table
    if args.kernel is not None:
        if not 1 <= args.jobs <= 4 * (os.cpu_count() or 1):
            fail(f"--jobs {args.jobs}: must be 1..{4 * (os.cpu_count() or 1)}")
        try:
            result = {"machine": machine(), **kernel_rate(args.kernel, args.campaign, args.jobs)}
        except RuntimeError as e:
            fail(f"bench: {e}")
        print(json.dumps(result) if args.json else kernel_table(result))
        return EXIT_AGREE
    try:
        result = run(seconds=args.campaign)
    except RuntimeError as e:
        fail(f"bench: {e}")
    print(json.dumps(result) if args.json else table(result))
    return EXIT_AGREE


def _write_c(out: Path, text: str, what: str, inputs: tuple[Path, ...] = ()) -> None:
    from stepfuzz.fuzz.findings.store import write_atomic
    out = output_file(str(out), inputs)
    write_atomic(out, text)
    print(f"{out}: {what}")


def cmd_export(args: argparse.Namespace) -> int:
    from stepfuzz.fuzz.findings.export import NotExportable, expectation, selftest, standalone
    if Path(args.case).is_dir():
        fail(f"{args.case}: export takes one case file (export-corpus takes a directory)")
    cases, bad = load_cases([args.case])
    if bad or not cases:
        return EXIT_BAD
    (path, case), = cases
    try:
        x = expectation(case)
        text = selftest([case]) if args.selftest else standalone([case])
    except NotExportable as e:
        fail(f"{path}: {e}")
    for d in x.dropped:
        print(f"stepfuzz: warning: {path}: not reproducible from userspace, left out: {d}", file=sys.stderr)
    kind = "KVM selftest" if args.selftest else "standalone reproducer"
    _write_c(Path(args.output), text, f"{kind} checking {len(x.pcs)} stops ({x.ending})", (path,))
    return EXIT_AGREE


def cmd_export_corpus(args: argparse.Namespace) -> int:
    from stepfuzz.fuzz.findings.export import NotExportable, expectation, selftest, standalone
    cases, bad = load_cases([args.dir])
    keep = []
    for path, case in cases:
        try:
            expectation(case)
            keep.append(case)
        except NotExportable as e:
            print(f"stepfuzz: {path}: skipped: {e}", file=sys.stderr)
    if not keep:
        fail(f"{args.dir}: no exportable cases")
    out = output_dir(args.output)
    _write_c(out / "stepfuzz_single_step.c", selftest(keep), f"table-driven KVM selftest, {len(keep)} cases")
    _write_c(out / "stepfuzz_repro.c", standalone(keep), f"standalone reproducer, {len(keep)} cases")
    return EXIT_BAD if bad else EXIT_AGREE


def cmd_corpus_merge(args: argparse.Namespace) -> int:
    from stepfuzz.fuzz.campaign.merge import corpus_merge
    eras_arg(args.era)
    check_max_steps(args.max_steps)
    sources = existing_dirs(args.dirs, "corpus")
    try:
        r = corpus_merge(sources, output_dir(args.output), args.era, args.max_steps, log=lambda m: print(m, file=sys.stderr))
    except RuntimeError as e:
        fail(str(e))
    print(f"{args.output}: {r['inputs']} inputs, {r['signatures']} divergence signatures "
          f"({r['added_for_signatures']} inputs kept for their signatures alone)")
    return EXIT_AGREE


def cmd_crashes_merge(args: argparse.Namespace) -> int:
    from stepfuzz.fuzz.campaign.merge import crashes_merge
    from stepfuzz.fuzz.campaign.merge import SameDirectory
    sources = existing_dirs(args.dirs, "crash")
    try:
        r = crashes_merge(sources, output_dir(args.output))
    except SameDirectory as e:
        fail(str(e))
    for e in r.unreadable:
        print(f"stepfuzz: warning: {e}", file=sys.stderr)
    print(f"{args.output}: {r.signatures} root causes ({r.merged_duplicates} findings merged into one found elsewhere)")
    return EXIT_AGREE


def cmd_eras(args: argparse.Namespace) -> int:
    for e in ERAS.values():
        print(f"{e.id:<9} {e.kernels}")
        print(f"{'':<9} {e.summary}")
        print(f"{'':<9} defined by: {e.commits}")
    return EXIT_AGREE


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stepfuzz", description="Differential fuzzer for KVM/arm64 guest single-step.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run cases through the reference and era models")
    r.add_argument("cases", nargs="+", metavar="CASE", help="case files or directories of them")
    add_era(r)
    add_json(r, "one JSON object per case and era")
    add_all_rows(r)
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("case", help="work with case files")
    csub = c.add_subparsers(dest="case_command", required=True, metavar="ACTION")
    cc = csub.add_parser("check", help="validate case files")
    cc.add_argument("files", nargs="+", metavar="FILE")
    cc.set_defaults(func=cmd_case_check)

    f = sub.add_parser("fuzz", help="run a coverage-guided campaign (atheris/libFuzzer), or one on a real kernel "
                                     "(--kernel)")
    add_era(f)
    f.add_argument("--kernel", metavar="K",
                   help="fuzz a real kernel instead of the models: 5.10, 6.1, 6.12, latest, a PATH to an arm64 "
                        "Image/vmlinuz, or `host`; --jobs VMs, each booted once (docs/campaigns.md)")
    f.add_argument("--batch", type=int, default=32, metavar="N", help="with --kernel: cases per batch (default 32)")
    f.add_argument("--boot-timeout", type=positive_seconds, default=120.0, metavar="S",
                   help="with --kernel: seconds a kernel may take to boot (default 120)")
    add_cache(f)
    f.add_argument("--time", help="how long: 90, 30s, 5m, 8h, 1h30m (default 60s unless --runs)")
    f.add_argument("--runs", type=int, help="stop after this many executions (per worker)")
    f.add_argument("--jobs", type=int, default=1, help="parallel workers on one shared corpus")
    f.add_argument("--corpus", default="corpus", help="corpus directory (default corpus/)")
    f.add_argument("--crashes", default="crashes", help="crash directory (default crashes/)")
    f.add_argument("--seed", type=int, help="libFuzzer seed (printed at start; reuse to repeat)")
    add_max_steps(f, "bound on any input's max_steps")
    f.add_argument("--code-coverage", action=argparse.BooleanOptionalAction, default=False,
                   help="also guide by coverage of the era models' policy code (about a quarter fewer executions; "
                        "default: behaviour features only)")
    f.add_argument("libfuzzer", nargs="*", metavar="-- LIBFUZZER_FLAG", help="extra libFuzzer flags after --")
    f.set_defaults(func=cmd_fuzz)

    st = sub.add_parser("status", help="summarise a running or finished campaign")
    st.add_argument("dir", nargs="?", default="crashes", metavar="DIR", help="its crash directory")
    st.set_defaults(func=cmd_status)

    pl = sub.add_parser("plot", help="draw execs/s, coverage and divergences over time (HTML)")
    pl.add_argument("dir", nargs="?", default="crashes", metavar="DIR")
    pl.add_argument("-o", "--output", help="output file (default DIR/plot.html)")
    pl.set_defaults(func=cmd_plot)

    mn = sub.add_parser("minimize", help="shrink a divergent case (or every case of a crash directory)")
    mn.add_argument("target", metavar="CASE|DIR")
    mn.add_argument("--era", help="the era it diverges on (crash directories know theirs)")
    mn.add_argument("-o", "--output", help="output file (default CASE.min.json; DIR/<id>/minimized.json)")
    mn.add_argument("-v", "--verbose", action="store_true",
                    help="show each shrink, and calls, shrinks and time per pass")
    from stepfuzz.fuzz.findings.minimize import MAX_CHECKS, MAX_SECONDS, MAX_SHRINKS
    mn.add_argument("--max-seconds", type=positive_seconds, default=MAX_SECONDS, metavar="S",
                    help=f"stop shrinking a case after this long (default {MAX_SECONDS:g})")
    mn.add_argument("--max-shrinks", type=int, default=MAX_SHRINKS, metavar="N",
                    help=f"... after this many successful shrinks (default {MAX_SHRINKS})")
    mn.add_argument("--max-checks", type=int, default=MAX_CHECKS, metavar="N",
                    help=f"... after this many checks (default {MAX_CHECKS})")
    mn.set_defaults(func=cmd_minimize)

    tr = sub.add_parser("triage", help="group a crash directory by root cause; Markdown (and HTML) report")
    tr.add_argument("dir", nargs="?", default="crashes", metavar="DIR")
    tr.add_argument("--html", metavar="FILE", help="also write an HTML report")
    add_json(tr, "one JSON object per root cause, instead of Markdown")
    tr.add_argument("--kernels", help="comma-separated real kernels to replay the smallest reproducers on")
    tr.set_defaults(func=cmd_triage)

    cm = sub.add_parser("corpus", help="work with corpora")
    cmsub = cm.add_subparsers(dest="corpus_command", required=True, metavar="ACTION")
    cmm = cmsub.add_parser("merge", help="combine and minimize corpora (libFuzzer -merge=1; resumable)")
    cmm.add_argument("dirs", nargs="+", metavar="DIR")
    cmm.add_argument("-o", "--output", required=True, metavar="OUT")
    add_era(cmm, help="the eras whose behaviour counts (default all)")
    add_max_steps(cmm, "bound on any input's max_steps, as in the campaigns")
    cmm.set_defaults(func=cmd_corpus_merge)

    cr = sub.add_parser("crashes", help="work with crash directories")
    crsub = cr.add_subparsers(dest="crashes_command", required=True, metavar="ACTION")
    crm = crsub.add_parser("merge", help="combine crash directories, one per signature")
    crm.add_argument("dirs", nargs="+", metavar="DIR")
    crm.add_argument("-o", "--output", required=True, metavar="OUT")
    crm.set_defaults(func=cmd_crashes_merge)

    bn = sub.add_parser("bench", help="cost of a differential check next to raw Unicorn, and campaign speed")
    add_json(bn, "one JSON object")
    bn.add_argument("--campaign", type=positive_seconds, default=30.0,
                    help="seconds of real campaign to time (default 30)")
    bn.add_argument("--kernel", metavar="K", help="time a campaign on this real kernel instead: cases per minute, "
                                                   "boot included and excluded, and what dominates")
    bn.add_argument("--jobs", type=int, default=2, help="with --kernel: VMs (default 2)")
    bn.set_defaults(func=cmd_bench)

    ex = sub.add_parser("export", help="a case as C: a standalone reproducer or a KVM selftest")
    ex.add_argument("case", metavar="CASE")
    kind = ex.add_mutually_exclusive_group(required=True)
    kind.add_argument("--standalone", action="store_true", help="self-contained, <linux/kvm.h> only; exit 0/1/2")
    kind.add_argument("--selftest", action="store_true", help="for tools/testing/selftests/kvm/arm64/")
    ex.add_argument("-o", "--output", required=True, metavar="FILE.c")
    ex.set_defaults(func=cmd_export)

    ec = sub.add_parser("export-corpus", help="a directory of (minimized) cases as one selftest and one reproducer")
    ec.add_argument("dir", metavar="DIR")
    ec.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    ec.set_defaults(func=cmd_export_corpus)

    rd = sub.add_parser("rediscover", help="time to first find of the known bug classes, with and without feedback")
    rd.add_argument("--seeds", type=int, default=5, help="seeds 1..N (default 5); medians are reported")
    rd.add_argument("--limit", type=float, default=120.0, help="seconds per run (default 120)")
    rd.set_defaults(func=cmd_rediscover)

    e = sub.add_parser("eras", help="list the era models and the kernels they stand for")
    e.set_defaults(func=cmd_eras)

    from stepfuzz.fuzz.cli import kvm as kvmcmd
    kvmcmd.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("stepfuzz: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_AGREE
    except OutputError as e:          # an output that cannot be written: nothing half-written is left
        print(f"stepfuzz: error: {e}", file=sys.stderr)
        return EXIT_BAD


if __name__ == "__main__":
    sys.exit(main())
