"""The harness: what one libFuzzer worker runs for each input.

Owns the atheris entry point (`stepfuzz_fuzzer`: decode, check on every
era, re-check a new divergence, keep it), the behaviour features that guide
the search (`features`) and the worker's own statistics (`workers`).
Imports stepfuzz.oracle, inputs and findings (the crash store).
"""
