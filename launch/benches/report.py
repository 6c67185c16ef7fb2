"""gpu_check's report: gpu_check.json and a Markdown table of the checks and of each check's rows."""

from __future__ import annotations

import json
from pathlib import Path

ROW_COLUMNS = ("checkpointing", "attention", "compile", "batch", "first_step_s", "ms_per_step",
               "samples_per_s", "mfu", "peak_gib", "loss", "error")


def markdown(report: dict) -> str:
    """The report as Markdown: one table of checks, then each check's rows."""
    header = f"`{report['command']}`  \n{report['machine']}; dry run: {report['dry_run']}"
    lines = ["# GPU check", "", header, "", "| # | check | result | seconds | summary |",
             "|---|---|---|---|---|"]
    for c in report["checks"]:
        result = "pass" if c["ok"] else "**FAIL**"
        summary = c["summary"].replace("|", "/").replace("\n", " ")
        lines.append(f"| {c['id']} | {c['name']} | {result} | {c['seconds']:.1f} | {summary} |")
    for c in report["checks"]:
        rows = c["details"].get("rows") if isinstance(c["details"], dict) else None
        if rows:
            columns = [k for k in ROW_COLUMNS if any(k in r for r in rows)]
            lines += ["", f"## {c['id']} {c['name']}", "", "| " + " | ".join(columns) + " |",
                      "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(str(r.get(k, "")) for k in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
