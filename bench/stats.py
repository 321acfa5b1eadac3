"""Statistics and the table: percentiles, summaries (median with its spread), the
project's performance targets and the one table the bench prints."""

import statistics

# Targets from issue #12 (on this 2-core machine); every other row is information.
# The client and N=32 targets are those of the release flow (``ov run --agent``).
TARGETS = {
    "ratio_agent_floor": (2.0, "le", "≤ 2.0x"),
    "client_agent_ms": (None, None, "≤ 2.0x floor (see ratio)"),
    "requests_per_s_n32": (1000.0, "ge", "≥ 1,000/s"),
    "p99_n32_ms": (50.0, "lt", "< 50 ms"),
    "cold_ms": (300.0, "lt", "< 300 ms"),
    "rss_idle_mib": (40.0, "lt", "< 40 MiB"),
    "rss_growth_mib": (2.0, "le", "≤ 2 MiB"),
    "scale_one_ratio": (1.2, "le", "≤ 1.2x"),
    "policy_decide_us": (50.0, "lt", "< 50 us"),
    "fleet_join_s": (10.0, "lt", "< 10 s"),
    "fleet_sync_ratio": (1.5, "lt", "< 1.5x"),
    "fleet_served_ms": (1000.0, "lt", "< 1 s"),
}


def pct(values, q):
    """Linear-interpolated percentile, q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values, spread="iqr"):
    """{'median', 'lo', 'hi', 'n', 'spread'}; spread 'iqr' (p25-p75) or 'range'."""
    if spread == "iqr" and len(values) < 8:
        spread = "range"
    lo, hi = ((pct(values, 25), pct(values, 75)) if spread == "iqr"
              else (min(values), max(values)))
    return {"median": statistics.median(values), "lo": lo, "hi": hi, "n": len(values),
            "spread": spread}


def ratios(numerators, denominators):
    """summary() of the pairwise ratios (the per-round ratios of alternating loops)."""
    return summary([a / b for a, b in zip(numerators, denominators)])


class Table:
    HEAD = ("metric", "median", "spread", "n", "target", "met")

    def __init__(self):
        self.rows = []      # ("section", title) or ("row", cells...)
        self.data = {}      # for --json

    def section(self, title):
        self.rows.append(("section", title))

    def add(self, key, label, stats, unit, fmt="{:.1f}", scale=1.0, target=None,
            value=None, number=None):
        """stats: a summary() dict (scaled by *scale*), or None with *value* text
        (and *number*, compared with the target when given)."""
        if stats is not None:
            med = stats["median"] * scale
            text = fmt.format(med) + (f" {unit}" if unit else "")
            kind = "IQR" if stats["spread"] == "iqr" else "range"
            spread = (f"{kind} {fmt.format(stats['lo'] * scale)}–"
                      f"{fmt.format(stats['hi'] * scale)}")
            n = str(stats["n"])
            self.data[key] = {"median": med, "lo": stats["lo"] * scale,
                              "hi": stats["hi"] * scale, "n": stats["n"], "unit": unit,
                              "spread": stats["spread"]}
        else:
            med, text, spread, n = number, value, "", ""
            self.data[key] = {"value": value}
        target_text, met = self._target(key, target, med)
        self.rows.append(("row", label, text, spread, n, target_text, met))

    def _target(self, key, target, med):
        """(target text, 'yes'/'NO'/'') of a row; records both in its --json data."""
        if target is None:
            return "info", ""
        limit, how, target_text = TARGETS[target]
        met = ""
        if how and med is not None:
            ok = {"le": med <= limit, "lt": med < limit, "ge": med >= limit}[how]
            met = "yes" if ok else "NO"
            self.data[key]["met"] = ok
        self.data[key]["target"] = target_text
        return target_text, met

    def info(self, key, label, value):
        """A row of text only (a ratio of medians, counters...), no target."""
        self.add(key, label, None, "", value=value)

    def annotate(self, suffix):
        """Append *suffix* to the value shown in the last row."""
        row = self.rows[-1]
        self.rows[-1] = row[:2] + (row[2] + suffix,) + row[3:]

    def sort_sections(self):
        """Put the sections in numeric order (their titles start with 'N.')."""
        blocks = []
        for row in self.rows:
            if row[0] == "section":
                blocks.append([row])
            else:
                blocks[-1].append(row)
        blocks.sort(key=lambda blk: int(blk[0][1].split(".")[0]))
        self.rows = [row for blk in blocks for row in blk]

    def render(self):
        cells = [self.HEAD] + [r[1:] for r in self.rows if r[0] == "row"]
        widths = [max(len(c[i]) for c in cells) for i in range(len(self.HEAD))]

        def line(c):
            return "  ".join([c[0].ljust(widths[0])] + [c[i].rjust(widths[i])
                              if i in (1, 3) else c[i].ljust(widths[i])
                              for i in range(1, len(c))]).rstrip()

        total = sum(widths) + 2 * (len(widths) - 1)
        out = [line(self.HEAD), "-" * total]
        for row in self.rows:
            out.append(f"{row[1]}" if row[0] == "section" else line(row[1:]))
        out.append("-" * total)
        return "\n".join(out)
