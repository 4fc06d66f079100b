"""The benchmark measures what it says (its figures are for people; no timing is asserted)."""
from stepfuzz.fuzz.campaign.bench import SIZES, bench_cases, campaign_rate, measure, table
from stepfuzz.oracle.guest import execute
from stepfuzz.oracle.vocabulary import Outcome


def test_bench_cases_have_the_length_and_mix_they_claim():
    for n in SIZES:
        cases = bench_cases(n, 20, seed=n)
        assert all(len(c.words) == n for c in cases)
        logs = [execute(c) for c in cases]
        assert all(log.outcome == Outcome.END and log.n >= 0.6 * n for log in logs)   # runs to the end (branches skip a few)
        traps = sum(len(log.specials) for log in logs) / sum(log.n for log in logs)
        assert 0.03 < traps < 0.3, traps
        assert any(c.events for c in cases)


def test_every_variant_and_the_campaign_are_measured(tmp_path):
    t = measure(per_size=2, rounds=1)
    assert set(t) == set(SIZES)
    assert all(set(row) == {"raw", "reference", "ref+1 era", "ref+all eras"} and min(row.values()) > 0
               for row in t.values())
    rate, rss = campaign_rate(4)
    assert rate > 0 and rss > 0
    result = {"machine": "x", "us_per_case": {str(n): row for n, row in t.items()}, "diff_vs_raw": 1, "all_eras_vs_raw": 1,
              "scaling_256_64": 1, "fuzz_execs_per_s": rate, "rss_mb": rss, "fuzz_execs_per_s_code_coverage": rate}
    text = table(result)
    assert text.startswith("machine: x")
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split("|")[1].strip() for row in rows] == [str(n) for n in SIZES]      # one row per size
