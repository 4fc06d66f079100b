"""A real kernel against the era model that stands for it, case by case:
the library behind `stepfuzz kvm check` and triage's real-kernel column."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..case import Case
from ..kvm.eras import Era
from ..run import Result, check
from ..trace import Trace
from .batch import Difference, RealTrace, difference
from .kernels import Kernel
from .vm import BOOT_TIMEOUT, RunStats, run_cases


@dataclass(frozen=True)
class Comparison:
    """One case on a real kernel.  `status` is identical, differs, model-only
    (it differs where QEMU's TCG cannot show what hardware does: the
    difference says why), error (the run produced no kernel result) or
    not-compared (the case cannot be reproduced there; `real.detail` says why)."""
    source: str
    case: Case
    real: RealTrace
    result: Result | None = None          # the era model's run of the case (when compared)
    difference: Difference | None = None

    @property
    def model(self) -> Trace | None:
        return self.result.model if self.result else None

    @property
    def status(self) -> str:
        if not self.real.compared:
            return "not-compared"
        if self.real.failed:
            return "error"
        if self.difference is None:
            return "identical"
        return "model-only" if self.difference.tcg_limit else "differs"


def compare_on_kernel(cases: list[tuple[str, Case]], kernel: Kernel | None, era: Era,
                      root: Path | None = None, boot_timeout: float = BOOT_TIMEOUT
                      ) -> tuple[list[Comparison], RunStats]:
    """Run `cases` on `kernel` (one boot) and compare each real trace with `era`'s model."""
    traces, stats = run_cases(cases, kernel, root, boot_timeout, era=era)
    out = []
    for (source, case), real in zip(cases, traces):
        if not real.compared or real.failed:
            out.append(Comparison(source, case, real))
            continue
        (result,) = check(case, [era])
        out.append(Comparison(source, case, real, result, difference(result.model, real)))
    return out, stats
