"""What several commands share: exit statuses, the one-line error, loading
cases and directories, and the options they take alike."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from stepfuzz.oracle.case import Case, CaseError, load_case
from stepfuzz.oracle.kvm.eras import UnknownEra, select

EXIT_AGREE, EXIT_DIVERGED, EXIT_BAD = 0, 1, 2


def fail(message: str) -> NoReturn:
    print(f"stepfuzz: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_BAD)


def case_paths(args: list[str]) -> list[Path]:
    """Files as given; directories expand to the *.json files below them."""
    out: list[Path] = []
    for a in args:
        p = Path(a)
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*.json") if q.is_file()))
        else:
            out.append(p)
    return out


def load_cases(args: list[str]) -> tuple[list[tuple[Path, Case]], int]:
    """Load every case; report each bad one on one line.  Returns (cases, n_bad)."""
    good, bad = [], 0
    paths = case_paths(args)
    if not paths:
        fail(f"no case files in {' '.join(args)}")
    for p in paths:
        try:
            good.append((p, load_case(p)))
        except CaseError as e:
            print(f"stepfuzz: {e}", file=sys.stderr)
            bad += 1
    return good, bad


def existing_dirs(names: list[str], what: str) -> list[Path]:
    """The directories named, or a one-line error for the first that is not one."""
    for name in names:
        if not Path(name).is_dir():
            fail(f"{name}: no such {what} directory")
    return [Path(name) for name in names]


def eras_arg(spec: str):
    try:
        return select(spec)
    except UnknownEra as e:
        fail(str(e))


# ---------------------------------------------------------------- options several commands take

def add_era(p: argparse.ArgumentParser, default: str | None = "all", help: str | None = None) -> None:
    p.add_argument("--era", default=default,
                   help=help or "era id, comma-separated ids, or all (default)")


def add_json(p: argparse.ArgumentParser, what: str = "one JSON object per case") -> None:
    p.add_argument("--json", action="store_true", help=what)


def add_all_rows(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true", help="show every stop of long traces")


def add_max_steps(p: argparse.ArgumentParser, help: str) -> None:
    from stepfuzz.fuzz.inputs.encoding import MAX_STEPS_BOUND
    p.add_argument("--max-steps", type=int, default=MAX_STEPS_BOUND, help=f"{help} (default {MAX_STEPS_BOUND})")


def check_max_steps(n: int) -> None:
    """--max-steps: a bound a case may carry (docs/case-format.md)."""
    from stepfuzz.oracle.case import MAX_STEPS_LIMIT
    if not 1 <= n <= MAX_STEPS_LIMIT:
        fail(f"--max-steps {n}: must be 1..{MAX_STEPS_LIMIT} (it bounds every input's max_steps)")


def positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds greater than 0."""
    import math
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds above 0, not {text!r}")
    return value


def add_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", metavar="DIR", help="cache directory (default $STEPFUZZ_CACHE or ~/.cache/stepfuzz)")


def add_kernel(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", metavar="K",
                   help="5.10, 6.1, 6.12, latest (cached by `stepfuzz kernels fetch`), a PATH to an arm64 "
                        "Image/vmlinuz, or `host` (an arm64 host's own /dev/kvm; the default there)")
    p.add_argument("--boot-timeout", type=positive_seconds, default=120.0, metavar="S",
                   help="seconds the kernel may take to boot (default 120)")
    add_cache(p)


# ---------------------------------------------------------------- outputs

FINDING_FILES = ("case.json", "divergence.json", "minimized.json", "report.txt")


def output_file(text: str | None, inputs: tuple[Path, ...] = ()) -> Path:
    """An output file as the user named it, or a one-line error: it must be
    named, must not be one of the inputs, and must not be a file of a
    finding (a crash directory's case.json, ...); what is in the way of it
    is for write_atomic to refuse."""
    if text is None or not str(text).strip():
        fail("an output file must be named (got an empty path)")
    out = Path(text)
    if any(out.resolve() == Path(i).resolve() for i in inputs):
        fail(f"{out}: is the input; not replaced")
    if out.name in FINDING_FILES and (out.parent / "divergence.json").exists():
        fail(f"{out}: a file of the finding in {out.parent}; not replaced")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"{out.parent}: cannot make the directory: {e.strerror or e}")
    return out


def output_dir(text: str | None) -> Path:
    """An output directory, made if missing, or a one-line error."""
    if text is None or not str(text).strip():
        fail("an output directory must be named (got an empty path)")
    out = Path(text)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        fail(f"{out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"{out}: cannot make the directory: {e.strerror or e}")
    return out
