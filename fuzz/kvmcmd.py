"""`stepfuzz kernels ...` and `stepfuzz kvm ...`: real kernels under QEMU (filled in by the real-KVM work)."""
from __future__ import annotations

import argparse


def register(sub: "argparse._SubParsersAction") -> None:
    """Add the kernels/kvm sub-commands to the stepfuzz parser."""
