"""Real KVM as the third oracle: Debian arm64 kernels booted under
qemu-system-aarch64 (or a native arm64 host with /dev/kvm) run the same cases
the models run (docs/real-kvm.md).

kernels.py fetches and names kernels, runner.c is the VMM that runs inside
the guest kernel, batch.py writes its input and parses its output, vm.py
builds and boots everything.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path


class RealKvmError(RuntimeError):
    """A problem of the machine or the input, not of a case; str() is one line."""


def cache_root(override: str | os.PathLike[str] | None = None) -> Path:
    """Where kernels, apt lists and the built runner live (never in the repo)."""
    if override:
        return Path(override).expanduser()
    if os.environ.get("STEPFUZZ_CACHE"):
        return Path(os.environ["STEPFUZZ_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stepfuzz"


def last_line(text: str, default: str) -> str:
    """The last non-empty line of a tool's output, for a one-line error."""
    lines = text.strip().splitlines()
    return lines[-1].strip() if lines else default


def need_tool(name: str, package: str) -> str:
    """The path of `name`, or a one-line error naming the Debian package that has it."""
    path = shutil.which(name)
    if path is None:
        raise RealKvmError(f"{name} not found: install the Debian package {package} (apt-get install {package})")
    return path
