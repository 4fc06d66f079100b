import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stepfuzz.oracle.realkvm import RealKvmError, kernels

REPO = Path(__file__).resolve().parent.parent
# Real-kernel tests skip without QEMU or a kernel, unless this is set (CI), where they fail.
REQUIRE = bool(os.environ.get("STEPFUZZ_REQUIRE_KVM"))
CORPUS = REPO / "corpus"

CODE = {"base": "0x10000", "size": "0x10000", "kind": "ram", "prefault": True}
DATA = {"base": "0x40000", "size": "0x4000", "kind": "ram"}
MMIO = {"base": "0x20000000", "size": "0x1000", "kind": "mmio"}


def stepfuzz(*args, timeout: float = 900, cwd: Path = REPO, env: dict | None = None):
    """Run the stepfuzz command as a user would (python -m, in the repository)."""
    return subprocess.run([sys.executable, "-m", "stepfuzz.fuzz.cli.main", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


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


def unavailable(why: str):
    if REQUIRE:
        pytest.fail(f"{why} (STEPFUZZ_REQUIRE_KVM is set)")
    pytest.skip(why)


@pytest.fixture(scope="session")
def tools():
    for tool, package in (("qemu-system-aarch64", "qemu-system-arm"), ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu")):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is missing (Debian package {package})")


@pytest.fixture(scope="session")
def kernel(tools):
    """name -> Kernel, fetched into the cache when missing (once: a failed
    fetch is remembered for the session, not tried again by every test)."""
    got: dict[str, object] = {}
    failed: dict[str, str] = {}

    def get(name: str):
        if name in failed:
            unavailable(failed[name])
        if name not in got:
            try:
                got[name] = kernels.resolve(name)
            except RealKvmError:
                try:
                    kernels.fetch(name, log=lambda line: None)
                    got[name] = kernels.resolve(name)
                except RealKvmError as e:
                    failed[name] = f"kernel {name} cannot be fetched: {e}"
                    unavailable(failed[name])
        return got[name]
    return get


def padded_6_1_case():
    """The 6.1 immediate-exit bug (one MMIO load, the instruction after it,
    one event) hidden in 40 instructions of unrelated work."""
    import random
    from dataclasses import replace

    from stepfuzz.fuzz.inputs import insns as I
    from stepfuzz.oracle.case import load_case
    rnd = random.Random(3)
    known = load_case(CORPUS / "known" / "6.1-immediate-exit-after-mmio.json")
    noise = [I.add_imm(rnd.randrange(8), rnd.randrange(8), rnd.randrange(4096)) for _ in range(19)]
    loads = [I.ldst_uimm(3, 1, 5, 20, 8 * i) for i in range(3)] + [I.debug_reg(True, 6, 4, 1)]
    words = noise[:10] + loads + [known.words[1], I.add_imm(0, 0, 1)] + noise[10:] + loads[:2]
    words += [I.NOP] * (40 - len(words))
    regs = dict(known.regs) | {"x20": 0x40000}
    memory = known.memory + (load_case(CORPUS / "exits" / "stage2-data-fault.json").memory[1],)
    case = replace(known.with_words(), words=tuple(words[:40]),
                   regs=tuple(sorted(regs.items(), key=lambda kv: int(kv[0][1:]))), memory=memory, expect=())
    assert len(case.words) == 40
    return case


def survivors(running, seconds: float) -> list[str]:
    """Wait up to `seconds` for `running()` (pids) to come back empty; kill
    and return whatever is still running then (for a test to assert on)."""
    import signal
    import time
    deadline = time.time() + seconds
    while time.time() < deadline and running():
        time.sleep(0.2)
    left = running()
    for pid in left:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left

