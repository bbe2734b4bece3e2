"""The measuring loop the benchmarks share: each tool in its own subprocess, rounds alternating the order."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from extract import run_measured


def measure(cmds: dict[str, tuple[list[str], Path]], repeats: int, threads: int, work: Path) -> dict:
    """Run every ``(command, output directory)`` of ``cmds`` ``repeats`` times; the order rotates by one each round
    (two tools alternate which goes first), so no tool always runs first or right after the same one.

    Returns:
        ``{"loads": [1-min load average at each start], "tools": {tool: {rc, walls, wall_s (median), cpus, cpu_s
        (median), peak_rss (largest)}}}`` (CPU seconds: user + system).
    """
    tools = list(cmds)
    runs: dict[str, list[dict]] = {tool: [] for tool in tools}
    loads = []
    for i in range(repeats):
        order = tools[i % len(tools):] + tools[: i % len(tools)]
        for tool in order:
            cmd, out = cmds[tool]
            shutil.rmtree(out, ignore_errors=True)
            loads.append(Path("/proc/loadavg").read_text().split()[0])
            print(f"running {tool} ({i + 1}/{repeats}), load {loads[-1]} ...", file=sys.stderr)
            runs[tool].append(run_measured(cmd, threads, work / f"{tool.replace(' ', '-')}.log"))
            print(f"  {runs[tool][-1]}", file=sys.stderr)
    summary = {}
    for tool in tools:
        walls = sorted(run["wall_s"] for run in runs[tool])
        cpus = sorted(run["cpu_s"] for run in runs[tool])
        summary[tool] = {"rc": max(run["rc"] for run in runs[tool]), "walls": walls, "wall_s": walls[len(walls) // 2],
                         "cpus": cpus, "cpu_s": cpus[len(cpus) // 2],
                         "peak_rss": max(run["peak_rss"] for run in runs[tool])}
    return {"loads": loads, "tools": summary}
