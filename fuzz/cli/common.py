"""What several commands share: exit statuses, the one-line error, loading
cases and directories, and the options they take alike."""
from __future__ import annotations

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
