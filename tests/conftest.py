import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "corpus"

CODE = {"base": "0x10000", "size": "0x10000", "kind": "ram", "prefault": True}
DATA = {"base": "0x40000", "size": "0x4000", "kind": "ram"}
MMIO = {"base": "0x20000000", "size": "0x1000", "kind": "mmio"}


def make(asm: str, regs=None, memory=(CODE,), events=(), **extra) -> dict:
    """A case as decoded JSON, for tests to tweak."""
    c = {"stepfuzz": 1, "code": {"base": "0x10000", "asm": asm}, "memory": list(memory)}
    if regs:
        c["regs"] = regs
    if events:
        c["events"] = list(events)
    c.update(extra)
    return c


@pytest.fixture
def write_case(tmp_path):
    def write(data, name="case.json") -> Path:
        p = tmp_path / name
        p.write_text(data if isinstance(data, str) else json.dumps(data))
        return p
    return write
