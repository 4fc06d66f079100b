#!/usr/bin/env python3
"""stepfuzz's libFuzzer harness (atheris).

Run it through `stepfuzz fuzz`, or directly with libFuzzer flags:
    fuzz/stepfuzz_fuzzer.py CORPUS_DIR -runs=1000
Configuration comes from the environment:
    STEPFUZZ_ERAS     era ids, comma-separated, or all (default; 7.2,arch when
                      packed for an engine: there every finding should be news,
                      and older eras diverge on almost every input)
    STEPFUZZ_CRASHES  crash directory (default crashes)
    STEPFUZZ_STARTED  campaign start, seconds since the epoch (for time-to-find)
    STEPFUZZ_CODE_COVERAGE  1: also guide by the coverage of the era models'
                      policy code (default 0: behaviour features only)
    STEPFUZZ_MAX_STEPS  bound on max_steps of any input (default 100), so no
                      input can make one execution slow
    STEPFUZZ_ON_DIVERGENCE  record (default here): keep it in the crash store and
                      go on; crash (default when packed by PyInstaller, as
                      ClusterFuzzLite/OSS-Fuzz run it): raise on a signature new
                      to this process, so the engine stores and deduplicates it
A divergence never stops a local campaign.  The search is guided by
behaviour features (fuzz/features.py): every new kind of stop, per era, is
new coverage; on request also by the coverage of the era models' code.
"""
import os
import signal
import sys
import time

import atheris

# Code coverage, on request: the era models' policy decisions -- the methods of
# the kernel model where releases differ.  Not by default: tracing them costs
# about a quarter of the executions and, in side-by-side campaigns, found no
# root cause the behaviour features alone did not (docs/campaigns.md).  The
# guest CPU, the run loop and the comparator are never instrumented: their
# branches saturate at once.
import stepfuzz.oracle.kvm.kernel  # noqa: E402
POLICY_METHODS = ("setup_debug", "clear_debug", "vcpu_load", "vcpu_put", "skip_instr", "adjust_pc",
                  "fake_step", "mmio_return", "handle_guest_debug", "handle_trap")
if os.environ.get("STEPFUZZ_CODE_COVERAGE", "0") == "1":
    for _name in POLICY_METHODS:
        setattr(stepfuzz.oracle.kvm.kernel.Kvm, _name, atheris.instrument_func(getattr(stepfuzz.oracle.kvm.kernel.Kvm, _name)))
from stepfuzz.oracle.kvm.eras import select
from stepfuzz.oracle.run import check
from stepfuzz.fuzz.harness import features
from stepfuzz.fuzz.inputs.encoding import MAX_STEPS_BOUND, NotACase, decode_input

from stepfuzz.fuzz.findings.store import CrashStore
from stepfuzz.fuzz.harness.confirm import Keeper, UnstableDivergence
from stepfuzz.fuzz.inputs.mutate import custom_crossover, custom_mutator
from stepfuzz.fuzz.harness.workers import WorkerStats


class DivergenceFound(Exception):
    """Raised (in crash mode) so that a fuzzing engine records the input."""


ENGINE = bool(getattr(sys, "frozen", False))          # packed: run by ClusterFuzzLite / OSS-Fuzz
ERAS = select(os.environ.get("STEPFUZZ_ERAS", "7.2,arch" if ENGINE else "all"))
CRASH_MODE = os.environ.get("STEPFUZZ_ON_DIVERGENCE", "crash" if ENGINE else "record") == "crash"
# engines keep their own crash artifacts; a local crash store only where asked for
STORE = CrashStore(os.environ.get("STEPFUZZ_CRASHES", "crashes"),
                   started=float(os.environ.get("STEPFUZZ_STARTED", time.time())))
KEEPER = Keeper(STORE)        # confirms (checks again, whole) what the store keeps
_RAISERS: dict[str, object] = {}


def _raise_divergence(signature: str) -> None:
    """Raise from a function named after the signature: engines deduplicate
    crashes by their stack, so each signature becomes its own crash."""
    raiser = _RAISERS.get(signature)
    if raiser is None:
        name = "diverges_" + "".join(ch if ch.isalnum() else "_" for ch in signature)
        namespace = {"DivergenceFound": DivergenceFound}
        exec(f"def {name}(signature):\n    raise DivergenceFound(signature)\n", namespace)
        raiser = _RAISERS[signature] = namespace[name]
    raiser(signature)
INPUT_MAX_STEPS = int(os.environ.get("STEPFUZZ_MAX_STEPS", MAX_STEPS_BOUND))
STATS = WorkerStats(STORE.root, STORE.started)


def test_one_input(data: bytes) -> None:
    if _STOP:
        _stop()
    try:
        results = check(decode_input(data).bounded(INPUT_MAX_STEPS), ERAS, first_divergence_only=True)
    except NotACase:
        return                  # a broken JSON seed: `stepfuzz fuzz` warned about it
    except Exception as e:      # an oracle bug (decoding included): keep the input, go on
        STATS.oracle_error(data, e)
        return
    features.observe(results)
    new = []
    for r in results:
        if r.divergence is None:
            continue
        try:
            root = KEEPER.record(r, STATS.execs)
        except UnstableDivergence as e:     # an oracle bug too: keep the input
            STATS.keep_error(data, e)
            continue
        except Exception as e:              # attributing it failed: an oracle bug
            STATS.keep_error(data, e)
            continue
        if root is not None:
            new.append(root)
    STATS.tick(len(STORE.seen))
    if CRASH_MODE and new:
        KEEPER.flush()
        _raise_divergence(new[0])


def _at_exit(_arg=None) -> None:
    KEEPER.flush()
    STATS.write(len(STORE.seen), final=True)


_STOP: list[int] = []       # SIGINT / SIGTERM received


def _note_stop(signum: int, _frame) -> None:
    # Only noted here, acted on at the next input.  The default handler's
    # KeyboardInterrupt is lost when it lands in the custom mutator (atheris
    # swallows it there), and libFuzzer goes on fuzzing: about one stop
    # request in fifteen was ignored that way.
    _STOP.append(signum)


def _stop() -> None:
    # A requested end is a normal end, as -max_total_time's is (exit 0): in
    # -jobs mode libFuzzer's parent counts any other status as a failed job.
    try:
        _at_exit()
    except Exception:             # say so, but stop all the same
        import traceback
        traceback.print_exc()
    os._exit(0)


def _watch_supervisor(pid: int) -> None:
    """Stop when the `stepfuzz fuzz` that started this campaign is gone (a
    SIGKILL of it kills no child): a worker stops at its next input, and any
    process still here 5 s later -- libFuzzer's -jobs parent runs no inputs --
    exits."""
    while True:
        time.sleep(1)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        except OSError:
            continue
    _STOP.append(signal.SIGTERM)
    time.sleep(5)
    os._exit(0)


def main() -> None:
    # libFuzzer ends the process with exit(), which skips Python's own exit
    # handlers: register the final flush with the C library instead.
    import ctypes
    global _EXIT_HOOK
    _EXIT_HOOK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(_at_exit)
    ctypes.CDLL(None).__cxa_atexit(_EXIT_HOOK, None, None)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _note_stop)
    supervisor = os.environ.get("STEPFUZZ_SUPERVISOR", "")
    if supervisor.isdigit():
        import threading
        threading.Thread(target=_watch_supervisor, args=(int(supervisor),), daemon=True).start()
    for tree in features.TREES:
        atheris.instrument_func(tree)
    atheris.Setup(sys.argv, test_one_input, custom_mutator=custom_mutator, custom_crossover=custom_crossover)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
