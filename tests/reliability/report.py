"""The reliability suite's figures as a table: the last result of each case, from the file the
cases append to (build/reliability.jsonl, or LAMBDALAKE_RELIABILITY_RESULTS).

    python tests/reliability/report.py              # a table on the terminal
    python tests/reliability/report.py --markdown   # the same, for the README
"""

from __future__ import annotations

import json
import sys

from harness import RESULTS
from rich.console import Console
from rich.table import Table

COLUMNS = [("case", "case"), ("produced", "produced"), ("acknowledged", "acknowledged"),
           ("archived", "archived"), ("counted", "counted"), ("lost", "lost"),
           ("duplicated", "duplicated"), ("five_xx", "5xx"), ("refused_503", "503 + Retry-After"),
           ("recovery_s", "recovery s"), ("max_rss_mb", "max RSS MB"),
           ("acknowledged_per_s", "acknowledged/s")]


def latest() -> list[dict]:
    if not RESULTS.exists():
        raise SystemExit(f"no results yet at {RESULTS}: run `make test-reliability`")
    cases: dict[str, dict] = {}
    for line in RESULTS.read_text().splitlines():
        result = json.loads(line)
        cases[result["case"]] = result
    return list(cases.values())


def markdown(rows: list[dict]) -> str:
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join(str(row.get(key, "")) for key, _ in COLUMNS) + " |"
            for row in rows]
    return "\n".join([head, rule, *body])


def main() -> None:
    rows = latest()
    if "--markdown" in sys.argv:
        print(markdown(rows))
        return
    table = Table(title=f"reliability ({RESULTS})")
    for _, title in COLUMNS:
        table.add_column(title, justify="left" if title == "case" else "right")
    for row in rows:
        table.add_row(*(str(row.get(key, "")) for key, _ in COLUMNS))
    Console(width=240).print(table)  # its natural width, never folded: make pipes the output
    bad = [r["case"] for r in rows if r["lost"] or r["duplicated"] or r["five_xx"]]
    if bad:
        raise SystemExit(f"lost, duplicated or 5xx in: {', '.join(bad)}")


if __name__ == "__main__":
    main()
