"""stepfuzz.fuzz: everything that searches and reports.

Five rooms, one job each, listed in the order a case flows through them:

    inputs/    the byte encoding of cases, the generator, the mutator
    harness/   the atheris harness a libFuzzer worker runs: check, observe, keep
    findings/  what a campaign keeps: the crash store, minimizing, triage,
               reports, export as C
    campaign/  supervising campaigns and what surrounds them: status, plots,
               merges, rediscovery, benchmarks
    cli/       the `stepfuzz` command: parse, call one library function, print

A room imports stepfuzz.oracle and the rooms listed before it, never one
after it; cli/ may import them all and nothing imports cli/.  The test
tests/test_layout.py enforces this and the absence of import circles.
"""
