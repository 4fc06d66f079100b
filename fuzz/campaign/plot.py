"""`stepfuzz plot DIR`: a campaign's progress over time, drawn with matplotlib
(real axes, ticks and units) as SVG inside one HTML page."""
from __future__ import annotations

import html
import io
import math
from pathlib import Path
from typing import Any

from stepfuzz.fuzz.findings.crashdir import write_atomic


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(minutes since the first record, values) of one numeric field; records
    without it (or with junk in it) are left out."""
    t0 = next((t for r in records if (t := _number(r.get("t"))) is not None), 0.0)
    xs, ys = [], []
    for r in records:
        t, y = _number(r.get("t")), _number(r.get(key))
        if t is not None and y is not None:
            xs.append((t - t0) / 60)
            ys.append(y)
    return xs, ys


def by_key(records: list[dict], field: str) -> dict[str, tuple[list[float], list[float]]]:
    """One series per key of a dict-valued field (divergences by era)."""
    keys = sorted({k for r in records if isinstance(r.get(field), dict) for k in r[field]})
    out = {}
    for k in keys:
        flat = [{"t": r.get("t"), "v": r[field].get(k)} for r in records if isinstance(r.get(field), dict)]
        out[k] = series(flat, "v")
    return out


def figure_svg(records: list[dict]) -> str:
    import matplotlib
    matplotlib.use("svg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, MaxNLocator

    fig, axes = plt.subplots(4, 1, figsize=(9, 11), sharex=True, constrained_layout=True)
    ax = axes[0]
    ax.plot(*series(records, "execs_per_s"), color="tab:blue")
    ax.set_ylabel("executions / s")
    ax.set_title("speed")
    ax = axes[1]
    for key, label in (("cov", "libFuzzer cov"), ("ft", "libFuzzer ft (with behaviour features)")):
        ax.plot(*series(records, key), label=label)
    ax.set_ylabel("coverage points")
    ax.set_title("coverage")
    ax.legend(loc="lower right")
    ax = axes[2]
    roots = "roots" if any("roots" in r for r in records) else "unique"
    ax.plot(*series(records, roots), color="black", linewidth=2,
            label="root causes" if roots == "roots" else "unique divergences")
    for era, (xs, ys) in by_key(records, "by_era").items():
        ax.plot(xs, ys, linewidth=1, label=f"era {era}")
    ax.set_ylabel("found (cumulative)")
    ax.set_title("divergences: root causes, and those seen on each era")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="upper left", fontsize="small", ncol=3)
    ax = axes[3]
    ax.plot(*series(records, "rss_mb"), color="tab:red")
    ax.set_ylabel("RSS (MB, largest worker)")
    ax.set_title("memory")
    ax.set_xlabel("minutes since the campaign started")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.yaxis.set_major_formatter(EngFormatter(sep=""))
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]          # inline: drop the XML prolog


def write_plot(records: list[dict], crashes: Path, out: Path) -> None:
    title = f"stepfuzz campaign: {crashes}"
    body = figure_svg(records) if records else "<p>no statistics recorded yet</p>"
    last = records[-1] if records else {}
    summary = ", ".join(f"{k} {html.escape(str(last[k]))}" for k in ("elapsed_s", "execs", "corpus", "cov", "roots", "unique")
                        if k in last)
    write_atomic(out, f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
                      f"<style>body{{font:14px sans-serif;margin:2em}}</style>"
                      f"<h1>{html.escape(title)}</h1><p>{summary}</p>{body}\n")
