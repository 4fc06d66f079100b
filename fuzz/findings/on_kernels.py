"""Findings confirmed on real kernels: replay each root cause's smallest
reproducer on each kernel (one boot per kernel) and say what it shows."""
from __future__ import annotations

from typing import NamedTuple

from stepfuzz.oracle.case import load_case
from stepfuzz.oracle.kvm.eras import Era, select
from stepfuzz.oracle.realkvm import RealKvmError, kernels, vm
from stepfuzz.oracle.realkvm.check import compare_on_kernel
from stepfuzz.oracle.realkvm.kernels import Kernel


class NotConfirmable(ValueError):
    """A kernel that cannot confirm anything (unknown, not cached, no version)."""


class Target(NamedTuple):
    name: str                     # as the user gave it
    kernel: Kernel | None         # None: this host's own KVM
    era: Era                      # the era model that stands for it


def resolve_kernels(names: list[str]) -> list[Target]:
    """The kernels named, each with the era that stands for it; NotConfirmable
    for the first that cannot be used.  Called before anything boots (and
    before triage reads a crash directory), so a bad name costs nothing."""
    if not [n for n in names if n.strip()]:
        raise NotConfirmable("--kernels: name at least one kernel (5.10, 6.1, 6.12, latest or a PATH)")
    targets = []
    for name in names:
        try:
            kernel = kernels.target(name, native=vm.native())
        except RealKvmError as e:
            raise NotConfirmable(f"triage on {name}: {e}") from None
        era = kernels.era_of(kernel)
        if era is None:
            raise NotConfirmable(f"triage on {name}: cannot tell the kernel's version, so not which era stands for it")
        targets.append(Target(name, kernel, select(era)[0]))
    return targets


def confirm_on_kernels(reproducers: list[str], targets: list[Target]) -> list[dict[str, str]]:
    """What each kernel (resolve_kernels) shows for each reproducer: `shows
    it` (the real trace is its era model's, and that diverges), `ideal`
    (identical, and the model does not diverge), `differs from era E` (the
    kernel departs from its model: a gap in stepfuzz), `not reproducible
    here` or `error (...)`."""
    cases = [(str(path), load_case(path)) for path in reproducers]
    verdicts: list[dict[str, str]] = [{} for _ in cases]
    for name, kernel, era in targets:
        try:
            rows, _ = compare_on_kernel(cases, kernel, era)
        except RealKvmError as e:
            raise NotConfirmable(f"triage on {name}: {e}") from None
        for verdict, row in zip(verdicts, rows):
            status = row.status
            if status == "not-compared":
                verdict[name] = "not reproducible here"
            elif status == "error":
                verdict[name] = f"error ({row.real.end})"
            elif status == "differs":
                verdict[name] = f"differs from era {era.id}"
            else:
                verdict[name] = "shows it" if row.result.divergence else "ideal"
    return verdicts


def triage_on_kernels(buckets, targets: list[Target]) -> None:
    """Fill each triage bucket's real-kernel column (see `confirm_on_kernels`)."""
    for b, verdict in zip(buckets, confirm_on_kernels([str(b.smallest.reproducer) for b in buckets], targets)):
        b.real.update(verdict)
