"""`stepfuzz kernels ...` and `stepfuzz kvm ...`: real kernels under QEMU."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from stepfuzz.oracle.realkvm import RealKvmError, cache_root
from stepfuzz.oracle.trace import Stop, Trace, numbered_exits

from stepfuzz.fuzz.cli.common import EXIT_AGREE, EXIT_BAD, EXIT_DIVERGED, eras_arg, fail, load_cases
from stepfuzz.fuzz.findings.report import exits_text, insn_at, shown_rows, stop_json

if TYPE_CHECKING:
    from stepfuzz.oracle.realkvm.batch import RealTrace

HOST = "host"                 # --kernel host: this arm64 machine's own KVM


def register(sub: "argparse._SubParsersAction") -> None:
    """Add the kernels/kvm sub-commands to the stepfuzz parser."""
    k = sub.add_parser("kernels", help="fetch and list Debian arm64 kernels for `stepfuzz kvm`")
    ksub = k.add_subparsers(dest="kernels_command", required=True, metavar="ACTION")
    f = ksub.add_parser("fetch", help="download kernels with apt (cached; a second fetch does nothing)")
    f.add_argument("names", nargs="*", metavar="NAME", help="5.10, 6.1, 6.12, latest (default: all)")
    f.add_argument("--refresh", action="store_true", help="look for a newer package even if one is cached")
    _cache_opt(f)
    f.set_defaults(func=cmd_kernels_fetch)
    ls = ksub.add_parser("list", help="show the cached kernels and the eras that stand for them")
    _cache_opt(ls)
    ls.set_defaults(func=cmd_kernels_list)

    v = sub.add_parser("kvm", help="run cases on a real kernel's KVM (under QEMU, or natively on arm64)")
    vsub = v.add_subparsers(dest="kvm_command", required=True, metavar="ACTION")
    r = vsub.add_parser("run", help="single-step cases on a real kernel and show the stops")
    r.add_argument("cases", nargs="+", metavar="CASE", help="case files or directories of them")
    _kernel_opts(r)
    r.add_argument("--json", action="store_true", help="one JSON object per case")
    r.add_argument("--all", action="store_true", help="show every stop of long traces")
    r.set_defaults(func=cmd_kvm_run)
    c = vsub.add_parser("check", help="compare a real kernel with the era model that stands for it")
    c.add_argument("cases", nargs="+", metavar="CASE", help="case files or directories of them")
    _kernel_opts(c)
    c.add_argument("--era", help="the era model to compare with (default: the one for the kernel's version)")
    c.add_argument("--json", action="store_true", help="one JSON object per case")
    c.set_defaults(func=cmd_kvm_check)
    e = vsub.add_parser("exec", help="boot a kernel with a static aarch64 program as /prog and relay its output")
    e.add_argument("program", metavar="PROGRAM")
    _kernel_opts(e)
    e.add_argument("--timeout", type=float, default=600.0, help="seconds the program may run (default 600)")
    e.set_defaults(func=cmd_kvm_exec)


def _cache_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", metavar="DIR", help="cache directory (default $STEPFUZZ_CACHE or ~/.cache/stepfuzz)")


def _kernel_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", metavar="K",
                   help="5.10, 6.1, 6.12, latest (cached by `stepfuzz kernels fetch`), a PATH to an arm64 "
                        "Image/vmlinuz, or `host` (an arm64 host's own /dev/kvm; the default there)")
    p.add_argument("--boot-timeout", type=float, default=120.0, metavar="S",
                   help="seconds the kernel may take to boot (default 120)")
    _cache_opt(p)


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
    return resolve_kernel(args.kernel, args.cache)


def resolve_kernel(spec: str | None, cache: str | None = None):
    """A --kernel value -> the Kernel to boot, or None for this host's own KVM."""
    from stepfuzz.oracle.realkvm import kernels, vm
    spec = spec or (HOST if vm.native() else None)
    if spec is None:
        fail("--kernel is required (5.10, 6.1, 6.12, latest or a PATH; see `stepfuzz kernels list`)")
    if spec == HOST:
        if not vm.native():
            fail("--kernel host needs an arm64 machine with /dev/kvm")
        return None
    try:
        return kernels.resolve(spec, cache_root(cache))
    except RealKvmError as e:
        fail(str(e))


def _describe(kernel) -> str:
    import platform
    if kernel is None:
        return f"host (Linux {platform.release()})"
    version = f"Linux {kernel.version}" if kernel.version else "version unknown"
    return f"{kernel.name} ({version}{', ' + kernel.release if kernel.release else ''})"


def _run(args: argparse.Namespace, cases, kernel):
    from stepfuzz.oracle.realkvm import vm
    try:
        return vm.run_cases([(str(p), c) for p, c in cases], kernel, cache_root(args.cache), args.boot_timeout)
    except RealKvmError as e:
        fail(str(e))


def _stats_line(stats, n: int) -> str:
    boot = f"booted in {stats.boot_seconds:.1f} s, " if stats.boot_seconds is not None else ""
    rate = f", {60 * stats.sent / stats.seconds:.0f} cases/min" if stats.seconds and stats.sent else ""
    return f"{boot}{stats.sent} of {n} case(s) sent, {stats.seconds:.1f} s in all{rate}" + \
        (f"; the run stopped early: {stats.problem}" if stats.problem else "")


def cmd_kvm_run(args: argparse.Namespace) -> int:
    cases, bad = load_cases(args.cases)
    kernel = _kernel(args)
    traces, stats = _run(args, cases, kernel)
    name = kernel.name if kernel else HOST
    for (path, case), t in zip(cases, traces):
        if args.json:
            print(json.dumps(_trace_json(t, name)))
        else:
            print(_trace_table(t, case, f"kernel {_describe(kernel)}", args.all))
            print()
    failed = sum(t.failed for t in traces)
    summary = f"{len(traces)} case(s) on {_describe(kernel)}: {_stats_line(stats, len(traces))}" + \
        (f"; {failed} failed to run" if failed else "")
    print(summary, file=sys.stderr if args.json else sys.stdout)
    return EXIT_BAD if bad or failed else EXIT_AGREE


def cmd_kvm_check(args: argparse.Namespace) -> int:
    from stepfuzz.oracle.realkvm.batch import difference
    from stepfuzz.oracle.run import check
    cases, bad = load_cases(args.cases)
    kernel = _kernel(args)
    if args.era:
        eras = eras_arg(args.era)
        if len(eras) != 1:
            fail("--era takes one era id")
        era = eras[0]
    else:
        era_id = _era_of(kernel)
        if era_id is None:
            fail(f"cannot tell the version of kernel {args.kernel}: pass --era")
        era = eras_arg(era_id)[0]
    traces, stats = _run(args, cases, kernel)
    name = kernel.name if kernel else HOST
    same = differ = failed = 0
    skipped: list[RealTrace] = []
    for (path, case), real in zip(cases, traces):
        if not real.compared:
            skipped.append(real)
            if args.json:
                print(json.dumps({"case": str(path), "kernel": name, "era": era.id, "status": real.end,
                                  "detail": real.detail}))
            continue
        if real.failed:
            failed += 1
            if args.json:
                print(json.dumps({"case": str(path), "kernel": name, "era": era.id, "status": "error",
                                  "real": _trace_json(real, name)}))
            else:
                print(f"{path}  ERROR on {name}: {real.end} {real.detail}")
                if real.console:
                    print("  console (last lines):\n    " + real.console.replace("\n", "\n    "))
            continue
        model = check(case, [era])[0].model
        d = difference(model, real)
        if d is None:
            same += 1
        else:
            differ += 1
        if args.json:
            print(json.dumps({"case": str(path), "kernel": name, "era": era.id,
                              "status": "identical" if d is None else "differs",
                              "difference": None if d is None else {"stop": d.stop, "what": d.what},
                              "model": {"stops": [stop_json(s) for s in model.stops], "end": model.outcome,
                                        "exits": _exits_json(numbered_exits(model.stops, model.tail))},
                              "real": _trace_json(real, name)}))
        elif d is None:
            print(f"{path}  identical on {name} and era {era.id}: {len(real.stops)} stops, {real.end}")
        else:
            print(_side_by_side(case, str(path), model, real, d, name, era.id))
            print()
    out = sys.stderr if args.json else sys.stdout
    if skipped and not args.json:
        print("not compared:")
        for t in skipped:
            print(f"  {t.source}: {t.end}: {t.detail}")
    n = same + differ
    print(f"{same}/{n} cases identical stop for stop ({_describe(kernel)} vs era {era.id})"
          + (f", {differ} differ" if differ else "")
          + (f", {len(skipped)} not compared" if skipped else "")
          + (f", {failed} failed to run" if failed else ""), file=out)
    print(_stats_line(stats, len(traces)), file=out)
    if bad or failed:
        return EXIT_BAD
    return EXIT_DIVERGED if differ else EXIT_AGREE


def _era_of(kernel) -> str | None:
    import platform
    from stepfuzz.oracle.realkvm.kernels import era_for_version
    if kernel is None:
        try:
            return era_for_version(platform.release())
        except ValueError:
            return None
    return kernel.era


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
        print(f"stepfuzz: error: {program} did not finish on {_describe(kernel)}: {stats.problem or 'no exit status'}",
              file=sys.stderr)
        if tail:
            print("console (last lines):\n  " + tail.replace("\n", "\n  "), file=sys.stderr)
        return EXIT_BAD
    return status


# ---------------------------------------------------------------- rendering

def _exits_json(numbered) -> list[dict[str, Any]]:
    return [{"after_stop": i, "kind": e.kind, "detail": e.detail} for i, e in numbered]


def _trace_json(t: RealTrace, kernel: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "case": t.source, "kernel": kernel,
        "stops": [{"pc": s.pc, "steps": s.steps, "isv": s.isv, "hsr": s.hsr} for s in t.stops],
        "exits": _exits_json(t.exits),
        "end": t.end, "steps_inferred": True,      # a real kernel does not report steps
    }
    if t.detail:
        out["detail"] = t.detail
    if t.notes:
        out["notes"] = t.notes
    if t.console:
        out["console"] = t.console
    return out


def _steps(s: Stop) -> str:
    return "?" if s.steps < 0 else f"~{s.steps}"


def _trace_table(t: RealTrace, case, where: str, show_all: bool = False) -> str:
    head = f"{t.source}  {where}: {t.end}" + (f" ({t.detail})" if t.detail else "")
    if not t.sent:
        return head
    if t.failed and not t.stops:
        return head + ("\n  console (last lines):\n    " + t.console.replace("\n", "\n    ") if t.console else "")
    lines = [head, f"  {'stop':>4}  {'stepped from':<38} {'pc':<12} {'steps':>5}  isv  exits in between"]
    prev_pc, last = case.base, -1
    for i in shown_rows(len(t.stops), 0, show_all):
        if i != last + 1:
            lines.append(f"  {'...':>4}")
        last = i
        s = t.stops[i]
        prev_pc = t.stops[i - 1].pc if i else case.base
        lines.append(f"  {i + 1:>4}  {f'{prev_pc:#x} {insn_at(case, prev_pc)}':<38} {s.pc:<#10x} {_steps(s):>5}  "
                     f"{s.isv:>3}  {exits_text(s.exits)}")
    if t.tail:
        lines.append("  after the last stop: " + exits_text(t.tail))
    for note in t.notes:
        lines.append(f"  note: {note}")
    lines.append("  (steps are inferred from the reference path: a real kernel does not report them)")
    if t.console:
        lines.append("  console (last lines):\n    " + t.console.replace("\n", "\n    "))
    return "\n".join(lines)


def _side_by_side(case, path: str, model: Trace, real: RealTrace, d, kernel: str, era: str) -> str:
    lines = [f"{path}  DIFFERS on {kernel} vs era {era} at stop {d.stop + 1}: {d.what}",
             f"  {'stop':>4}  {'model pc':<12} {'isv':>3}   {'real pc':<12} {'isv':>3}  exits before the stop"]
    n = max(len(model.stops), len(real.stops))
    last = -1
    for i in shown_rows(n, d.stop, False):
        if i != last + 1:
            lines.append(f"  {'...':>4}")
        last = i
        m = model.stops[i] if i < len(model.stops) else None
        r = real.stops[i] if i < len(real.stops) else None
        mcol = f"{m.pc:<#12x} {m.isv:>3}" if m else f"{'-':<12} {'':>3}"
        rcol = f"{r.pc:<#12x} {r.isv:>3}" if r else f"{'-':<12} {'':>3}"
        mark = "  <<" if i == d.stop else ""
        lines.append(f"  {i + 1:>4}  {mcol}   {rcol}{mark}")
        mex, rex = exits_text(m.exits) if m else "", exits_text(r.exits) if r else ""
        if mex or rex:
            lines.append(f"  {'':>4}    model: {mex or '-'}")
            lines.append(f"  {'':>4}    real:  {rex or '-'}")
    lines.append(f"  end: model {model.outcome}" + (f" ({model.detail})" if model.detail else "")
                 + f", real {real.end}" + (f" ({real.detail})" if real.detail else ""))
    if model.tail or real.tail:
        lines.append(f"  after the last stop: model [{exits_text(model.tail)}], real [{exits_text(real.tail)}]")
    return "\n".join(lines)


def triage_on_kernels(buckets, names: list[str]) -> None:
    """For each real kernel, replay every bucket's smallest reproducer (one
    boot per kernel) and say whether the kernel shows the divergence: its
    trace is identical to its era model's, which does or does not diverge
    from the reference.  A kernel that departs from its era model is flagged."""
    from stepfuzz.oracle.case import load_case
    from stepfuzz.oracle.realkvm import vm
    from stepfuzz.oracle.realkvm.batch import difference
    from stepfuzz.oracle.run import check
    cases = [(b.smallest["reproducer"], load_case(b.smallest["reproducer"])) for b in buckets]
    for name in names:
        kernel = resolve_kernel(name)
        era = _era_of(kernel)
        if era is None:
            fail(f"triage on {name}: cannot tell the kernel's version, so not which era stands for it")
        eras = eras_arg(era)
        try:
            traces, _ = vm.run_cases(cases, kernel)
        except RealKvmError as e:
            fail(f"triage on {name}: {e}")
        for b, (_, case), real in zip(buckets, cases, traces):
            if not real.compared:
                b.real[name] = "not reproducible here"
            elif real.failed:
                b.real[name] = f"error ({real.end})"
            else:
                (model,) = check(case, eras)
                if difference(model.model, real) is not None:
                    b.real[name] = f"differs from era {era}"
                else:
                    b.real[name] = "shows it" if model.divergence else "ideal"
