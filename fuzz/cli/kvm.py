"""`stepfuzz kernels ...` and `stepfuzz kvm ...`: real kernels under QEMU."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stepfuzz.oracle.realkvm import RealKvmError, cache_root
from stepfuzz.oracle.trace import numbered_exits

from stepfuzz.fuzz.cli.common import (EXIT_AGREE, EXIT_BAD, EXIT_DIVERGED, add_all_rows, add_cache, add_json,
                                      add_kernel, eras_arg, fail, load_cases, positive_seconds)
from stepfuzz.fuzz.findings.report import (exits_json, kernel_text, model_vs_real_table, real_trace_json,
                                           real_trace_table, run_stats_text, stop_json)


def register(sub: "argparse._SubParsersAction") -> None:
    """Add the kernels/kvm sub-commands to the stepfuzz parser."""
    k = sub.add_parser("kernels", help="fetch and list Debian arm64 kernels for `stepfuzz kvm`")
    ksub = k.add_subparsers(dest="kernels_command", required=True, metavar="ACTION")
    f = ksub.add_parser("fetch", help="download kernels with apt (cached; a second fetch does nothing)")
    f.add_argument("names", nargs="*", metavar="NAME", help="5.10, 6.1, 6.12, latest (default: all)")
    f.add_argument("--refresh", action="store_true", help="look for a newer package even if one is cached")
    add_cache(f)
    f.set_defaults(func=cmd_kernels_fetch)
    ls = ksub.add_parser("list", help="show the cached kernels and the eras that stand for them")
    add_cache(ls)
    ls.set_defaults(func=cmd_kernels_list)

    v = sub.add_parser("kvm", help="run cases on a real kernel's KVM (under QEMU, or natively on arm64)")
    vsub = v.add_subparsers(dest="kvm_command", required=True, metavar="ACTION")
    r = vsub.add_parser("run", help="single-step cases on a real kernel and show the stops")
    r.add_argument("cases", nargs="+", metavar="CASE", help="case files or directories of them")
    add_kernel(r)
    add_json(r)
    add_all_rows(r)
    r.set_defaults(func=cmd_kvm_run)
    c = vsub.add_parser("check", help="compare a real kernel with the era model that stands for it")
    c.add_argument("cases", nargs="+", metavar="CASE", help="case files or directories of them")
    add_kernel(c)
    c.add_argument("--era", help="the era model to compare with (default: the one for the kernel's version)")
    add_json(c)
    c.set_defaults(func=cmd_kvm_check)
    e = vsub.add_parser("exec", help="boot a kernel with a static aarch64 program as /prog and relay its output")
    e.add_argument("program", metavar="PROGRAM")
    add_kernel(e)
    e.add_argument("--timeout", type=positive_seconds, default=600.0, help="seconds the program may run (default 600)")
    e.set_defaults(func=cmd_kvm_exec)


# ---------------------------------------------------------------- kernels

def cmd_kernels_fetch(args: argparse.Namespace) -> int:
    from stepfuzz.oracle.realkvm.kernels import RELEASES, fetch
    names = args.names or list(RELEASES)
    for name in names:
        if name not in RELEASES:
            fail(f"unknown kernel {name!r} (known: {', '.join(RELEASES)})")
    root = cache_root(args.cache)
    try:
        for name in names:
            fetch(name, root, log=lambda line: print(line, flush=True), refresh=args.refresh)
    except RealKvmError as e:
        fail(str(e))
    return EXIT_AGREE


def cmd_kernels_list(args: argparse.Namespace) -> int:
    from stepfuzz.oracle.realkvm.kernels import cached
    root = cache_root(args.cache)
    rows = cached(root)
    if not rows:
        print(f"no kernels cached in {root / 'kernels'}: run `stepfuzz kernels fetch`")
        return EXIT_AGREE
    print(f"{'name':<7} {'version':<9} {'era':<5} {'package':<34} path")
    for m in rows:
        print(f"{m['name']:<7} {m['version']:<9} {m['era']:<5} {m['package'] + ' ' + m['deb_version']:<34} {m['path']}")
    return EXIT_AGREE


# ---------------------------------------------------------------- kvm

def _kernel(args: argparse.Namespace):
    """The Kernel to boot, or None for this host's own KVM."""
    from stepfuzz.oracle.realkvm import kernels, vm
    try:
        return kernels.target(args.kernel, cache_root(args.cache), native=vm.native())
    except RealKvmError as e:
        fail(str(e))


def cmd_kvm_run(args: argparse.Namespace) -> int:
    from stepfuzz.oracle.realkvm import vm
    cases, bad = load_cases(args.cases)
    kernel = _kernel(args)
    try:
        traces, stats = vm.run_cases([(str(p), c) for p, c in cases], kernel, cache_root(args.cache),
                                     args.boot_timeout)
    except RealKvmError as e:
        fail(str(e))
    name = kernel.name if kernel else "host"
    for (path, case), t in zip(cases, traces):
        if args.json:
            print(json.dumps(real_trace_json(t, name)))
        else:
            print(real_trace_table(t, case, f"kernel {kernel_text(kernel)}", args.all))
            print()
    failed = sum(t.failed for t in traces)
    summary = f"{len(traces)} case(s) on {kernel_text(kernel)}: {run_stats_text(stats, len(traces))}" + \
        (f"; {failed} failed to run" if failed else "")
    print(summary, file=sys.stderr if args.json else sys.stdout)
    return EXIT_BAD if bad or failed else EXIT_AGREE


def cmd_kvm_check(args: argparse.Namespace) -> int:
    from stepfuzz.oracle.realkvm.check import compare_on_kernel
    from stepfuzz.oracle.realkvm.kernels import era_of
    cases, bad = load_cases(args.cases)
    kernel = _kernel(args)
    era_id = args.era or era_of(kernel)
    if era_id is None:
        fail(f"cannot tell the version of kernel {args.kernel}: pass --era")
    eras = eras_arg(era_id)
    if len(eras) != 1:
        fail("--era takes one era id")
    era = eras[0]
    try:
        rows, stats = compare_on_kernel([(str(p), c) for p, c in cases], kernel, era, cache_root(args.cache),
                                        args.boot_timeout)
    except RealKvmError as e:
        fail(str(e))
    name = kernel.name if kernel else "host"
    for row in rows:
        if args.json:
            print(json.dumps(_comparison_json(row, name, era.id)))
        else:
            _print_comparison(row, name, era.id)
    counts = {s: sum(r.status == s for r in rows) for s in ("identical", "differs", "model-only", "error", "not-compared")}
    out = sys.stderr if args.json else sys.stdout
    if counts["not-compared"] and not args.json:
        print("not compared:")
        for r in rows:
            if r.status == "not-compared":
                print(f"  {r.real.source}: {r.real.end}: {r.real.detail}")
    same, differ = counts["identical"], counts["differs"]
    print(f"{same}/{same + differ} cases identical stop for stop ({kernel_text(kernel)} vs era {era.id})"
          + (f", {differ} differ" if differ else "")
          + (f", {counts['model-only']} model-only (QEMU TCG cannot show the hardware's order)"
             if counts["model-only"] else "")
          + (f", {counts['not-compared']} not compared" if counts["not-compared"] else "")
          + (f", {counts['error']} failed to run" if counts["error"] else ""), file=out)
    print(run_stats_text(stats, len(rows)), file=out)
    if bad or counts["error"]:
        return EXIT_BAD
    return EXIT_DIVERGED if differ else EXIT_AGREE


def _comparison_json(row, kernel: str, era: str) -> dict:
    status = row.status
    if status == "not-compared":
        return {"case": row.source, "kernel": kernel, "era": era, "status": row.real.end, "detail": row.real.detail}
    if status == "error":
        return {"case": row.source, "kernel": kernel, "era": era, "status": "error",
                "real": real_trace_json(row.real, kernel)}
    model, d = row.model, row.difference
    return {"case": row.source, "kernel": kernel, "era": era, "status": status,
            "difference": None if d is None else {"stop": d.stop, "what": d.what,
                                                  **({"tcg_limit": d.tcg_limit} if d.tcg_limit else {})},
            "model": {"stops": [stop_json(s) for s in model.stops], "end": model.outcome,
                      "exits": exits_json(numbered_exits(model.stops, model.tail))},
            "real": real_trace_json(row.real, kernel)}


def _print_comparison(row, kernel: str, era: str) -> None:
    status, real = row.status, row.real
    if status == "not-compared":
        return
    if status == "error":
        print(f"{row.source}  ERROR on {kernel}: {real.end} {real.detail}")
        if real.console:
            print("  console (last lines):\n    " + real.console.replace("\n", "\n    "))
    elif status == "identical":
        print(f"{row.source}  identical on {kernel} and era {era}: {len(real.stops)} stops, {real.end}")
    else:
        print(model_vs_real_table(row.case, row.source, row.model, real, row.difference, kernel, era))
        print()


def cmd_kvm_exec(args: argparse.Namespace) -> int:
    from stepfuzz.oracle.realkvm import vm
    program = Path(args.program)
    if not program.is_file():
        fail(f"{program}: no such file")
    kernel = _kernel(args)
    try:
        status, stats, tail = vm.run_program(program, kernel, cache_root(args.cache), args.boot_timeout, args.timeout)
    except RealKvmError as e:
        fail(str(e))
    if status < 0:
        print(f"stepfuzz: error: {program} did not finish on {kernel_text(kernel)}: {stats.problem or 'no exit status'}",
              file=sys.stderr)
        if tail:
            print("console (last lines):\n  " + tail.replace("\n", "\n  "), file=sys.stderr)
        return EXIT_BAD
    return status
