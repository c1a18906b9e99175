"""What ``duckpool bench`` prints and writes: numbers, tables, header, JSON, plot.

Every number is formatted here (:func:`_format_range` knows each unit a
``Quantity`` may have).  A table comes as plain text for a terminal or as
Markdown, under a header that names the command, the machine and the sizes;
``--json`` writes :func:`_document`, ``--plot`` draws the ratios with
matplotlib, imported only then.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, Optional, Sequence

from duckpool._bench._adapters import _BASELINE, LIBRARIES
from duckpool._bench._metrics import METRICS

if TYPE_CHECKING:
    from duckpool._bench._plan import _Plan


def _printable(text: str, fallback: str) -> str:
    """``text`` if stdout can encode it (a C-locale terminal may not), else ``fallback``."""
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return fallback
    return text


def _dash() -> str:
    return _printable("\N{EN DASH}", "-")


def _microseconds() -> str:
    return _printable("\N{MICRO SIGN}s", "us")


def _format_number(value: float) -> str:
    """Three significant digits with a k/M suffix: 41.2k, 987, 1.23M."""
    for divisor, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= divisor:
            return f"{value / divisor:.3g}{suffix}"
    return f"{value:.3g}"


def _format_value(value: float, unit: str) -> str:
    return _format_range([value], unit)


def _format_spread(summary: dict[str, Any], unit: str) -> str:
    """``low-high`` of the reps; empty with fewer than two reps or when they all agree."""
    if len(summary["samples"]) < 2 or summary["min"] == summary["max"]:
        return ""
    return _format_range([summary["min"], summary["max"]], unit)


def _scaled(values: list[float], scales: Sequence[tuple[float, str]], last: str) -> str:
    """``values`` in the largest scale their maximum reaches, the unit once at the end."""
    dash = _dash()
    for divisor, suffix in scales:
        if max(abs(v) for v in values) >= divisor:
            return dash.join(f"{v / divisor:.3g}" for v in values) + f" {suffix}"
    return dash.join(f"{v:.3g}" for v in values) + f" {last}"


def _format_range(values: list[float], unit: str) -> str:
    """One value, or ``low-high``, with the unit once at the end."""
    dash = _dash()
    if unit in ("tasks/s", "items/s"):
        return dash.join(_format_number(v) for v in values) + "/s"
    if unit == "us":
        return _scaled(values, ((1e6, "s"), (1e3, "ms")), _microseconds())
    if unit == "B":
        return _scaled(values, ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")), "B")
    if unit == "x":
        return dash.join(f"{v:.2f}" for v in values) + "x"
    if unit == "%":
        return dash.join(f"{v:.0f}" for v in values) + "%"
    if unit == "":
        return dash.join(f"{v:g}" for v in values)
    return dash.join(_format_number(v) for v in values) + f" {unit}"


def _format_cell(summary: dict[str, Any], unit: str) -> str:
    if summary.get("not_applicable"):
        return _dash()
    if summary["median"] is None:
        return "failed" if summary["failures"] else "n/a"
    text = _format_value(summary["median"], unit)
    if summary["ratio"] is not None:
        text += f" ({summary['ratio']:.2f}x)"
    if summary["failures"]:
        text += f" [{len(summary['failures'])} failed]"
    return text


def _row_title(row: dict[str, Any]) -> tuple[str, str]:
    # Times and sizes are scaled cell by cell (ms, MB, ...), each cell naming
    # its unit: a unit in the title would contradict most of them.
    unit = "" if row["unit"] in ("us", "B") else row["unit"]
    title = f"{row['label']} ({unit})" if unit else row["label"]
    if not row.get("compared", True):
        return title, "not ranked, no ratio"
    better = "higher is better" if row["higher_is_better"] else "lower is better"
    return title, better


def _method_text(start_method: Optional[str]) -> str:
    import multiprocessing

    if start_method is None:
        return f"library defaults (multiprocessing: {multiprocessing.get_start_method()})"
    return start_method


def _reps_text(plan: _Plan) -> str:
    fewer = {name: reps for name, reps in plan.metric_reps.items() if reps != plan.reps}
    text = f"{plan.reps} reps"
    if fewer:
        text += " (" + ", ".join(f"{name} {reps}" for name, reps in fewer.items()) + ")"
    return text


def _header_lines(plan: _Plan, date: str, machine: dict[str, Any], python: str) -> list[str]:
    cores = f"{machine['cores']} cores"
    if machine["usable_cores"] != machine["cores"]:
        cores += f" ({machine['usable_cores']} usable)"
    described = ", ".join(part for part in (machine["system"], cores, machine["cpu"]) if part)
    sizes = ", ".join(
        f"{name} {plan.sizes[name]} {METRICS[name].size_unit}" for name in plan.metrics
    )
    return [
        f"{plan.command} | {date} | {python} | {described} | "
        f"start method: {_method_text(plan.start_method)}",
        f"{plan.workers} workers, {_reps_text(plan)} per cell (median, min{_dash()}"
        f"max), {sizes}; ratio = library median / {_BASELINE} median",
    ]


def _terminal_table(rows: list[dict[str, Any]], libraries: Sequence[str]) -> list[str]:
    table: list[list[str]] = [["", *libraries]]
    for row in rows:
        title, better = _row_title(row)
        cells = [row["cells"][library] for library in libraries]
        table.append([title, *(_format_cell(cell, row["unit"]) for cell in cells)])
        table.append([f"  {better}", *(_format_spread(cell, row["unit"]) for cell in cells)])
    widths = [max(len(line[column]) for line in table) for column in range(len(table[0]))]
    lines = []
    for index, line in enumerate(table):
        first = line[0].ljust(widths[0])
        rest = [text.rjust(width) for text, width in zip(line[1:], widths[1:])]
        lines.append("  ".join([first, *rest]).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return lines


def _markdown_table(rows: list[dict[str, Any]], libraries: Sequence[str]) -> list[str]:
    lines = [
        "| metric | " + " | ".join(libraries) + " |",
        "|---|" + "---:|" * len(libraries),
    ]
    for row in rows:
        title, better = _row_title(row)
        cells = []
        for library in libraries:
            summary = row["cells"][library]
            spread = _format_spread(summary, row["unit"])
            text = _format_cell(summary, row["unit"])
            cells.append(f"{text} [{spread}]" if spread else text)
        lines.append(f"| {title}, {better} | " + " | ".join(cells) + " |")
    return lines


def _write_plot(path: str, document: dict[str, Any]) -> None:
    """A bar chart of every ranked row's advantage over the baseline, one panel per table.

    Drawn on matplotlib's Agg canvas directly: no pyplot, no global backend
    switch, nothing that needs a display.  DeprecationWarnings are silenced
    while drawing: they come from inside matplotlib and its dependencies
    (matplotlib 3.9 on Python 3.9 calls pyparsing names that pyparsing 3.3
    deprecates) and are nothing a benchmark user could act on.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        _draw_plot(path, document)


def _draw_plot(path: str, document: dict[str, Any]) -> None:
    """One panel per table; in each, a group of bars per ranked row.

    Every bar shows a library's *advantage* over the baseline: its ratio
    where higher is better, the inverse where lower is, so a bar above the
    1x line is better than the baseline whatever the metric, and twice as
    tall (on the log scale) is twice the advantage.  A black tick across
    duckpool's bar marks its goal.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    times = FuncFormatter(lambda value, _: f"{value:g}x")  # 2x, 0.5x: not 2e0
    baseline = document["baseline"]
    libraries = [name for name in document["libraries"] if name != baseline]
    runs = document["runs"]
    row_count = max((len(run["rows"]) for run in runs), default=1)
    figure = Figure(figsize=(max(8.0, 0.9 * row_count + 3), 5.5 * len(runs)))
    FigureCanvasAgg(figure)
    width = 0.8 / max(1, len(libraries))
    for index, run in enumerate(runs):
        axis = figure.add_subplot(len(runs), 1, index + 1)
        rows = [row for row in run["rows"] if row.get("compared", True)]
        goal_drawn = False
        for offset, library in enumerate(libraries):
            shift = (offset - (len(libraries) - 1) / 2) * width
            positions, advantages = [], []
            for position, row in enumerate(rows):
                ratio = row["cells"][library]["ratio"]
                if ratio:  # no bar for a failed or not-applicable cell
                    positions.append(position + shift)
                    advantages.append(_advantage(ratio, row["higher_is_better"]))
                goal = row.get("goal")
                if library == _SUBJECT and goal:
                    axis.hlines(
                        _advantage(goal, row["higher_is_better"]),
                        position + shift - width / 2,
                        position + shift + width / 2,
                        colors="black",
                        linewidth=2,
                        label="_nolegend_" if goal_drawn else f"{_SUBJECT}'s goal",
                        zorder=3,
                    )
                    goal_drawn = True
            # From the 1x line, up or down: on a log scale a bar from the axis
            # bottom would make every advantage look large.  A bar past the
            # axis (the stdlib's map without a chunksize: hundreds of times)
            # is cut there and labelled with its value.
            shown = [min(max(advantage, 1 / _PLOT_LIMIT), _PLOT_LIMIT) for advantage in advantages]
            axis.bar(positions, [a - 1.0 for a in shown], width, bottom=1.0, label=library)
            for where, advantage, drawn in zip(positions, advantages, shown):
                if drawn != advantage:
                    axis.annotate(
                        f"{advantage:.3g}x",
                        (where, drawn),
                        ha="center",
                        va="bottom" if advantage > 1 else "top",
                        fontsize=6,
                        rotation=90,
                    )
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_yscale("log")
        axis.set_ylim(1 / (_PLOT_LIMIT * 2), _PLOT_LIMIT * 2)
        axis.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.yaxis.set_major_formatter(times)
        axis.yaxis.set_minor_formatter(NullFormatter())
        axis.tick_params(axis="y", which="both", labelsize=7)
        axis.grid(axis="y", which="major", linewidth=0.3, alpha=0.5)
        axis.set_xticks(range(len(rows)))
        axis.set_xticklabels([row["label"] for row in rows], rotation=30, ha="right", fontsize=8)
        axis.set_ylabel(f"advantage over {baseline} (log scale)")
        axis.set_title(
            f"start method: {_method_text(run['start_method'])} (above 1x: better than "
            f"{baseline}; the ratio where higher is better, its inverse where lower is)",
            fontsize=9,
        )
        axis.legend(fontsize=8, ncol=max(1, len(libraries) + 1))
    figure.suptitle(f"{document['command']} | {document['date']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


#: The plot's axis ends at this advantage (and its inverse); bars past it are cut.
_PLOT_LIMIT = 30.0


def _advantage(ratio: float, higher_is_better: bool) -> float:
    """How many times better than the baseline: the ratio, or its inverse where lower is better."""
    return ratio if higher_is_better else 1.0 / ratio


#: The library whose goals the report checks.
_SUBJECT = "duckpool"
#: Columns that are not pools (the bare-pipe floor): no goal ranks against them.
_NOT_PEERS = frozenset({"pipe"})


def _goal_results(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """duckpool's goals in one table: each one met, tied, missed or not measured.

    A goal is on the ratio to the baseline (on the number itself for one not
    compared, the automatic map's share of the best).  A ratio that misses
    its goal by less than its own run-to-run spread (the goal lies between
    the lowest and highest ratio of a rep to the baseline's same rep) is a
    tie: another run could as well have met it.  A goal that also asks for
    the best of every peer is missed behind a peer whose median beats
    duckpool's, unless duckpool's best rep beats it too (a tie).
    """
    results = []
    for row in rows:
        goal = row.get("goal")
        cell = row["cells"].get(_SUBJECT)
        if goal is None or cell is None:
            continue
        compared = row.get("compared", True)
        value = cell["ratio"] if compared else cell["median"]
        if compared:
            spread = cell.get("ratio_spread")
        elif cell["min"] is not None and cell["min"] != cell["max"]:
            spread = [cell["min"], cell["max"]]
        else:
            spread = None
        higher = row["higher_is_better"]
        if value is None:
            verdict = "not measured"
        elif (value >= goal) if higher else (value <= goal):
            verdict = "met"
        elif spread is not None and spread[0] <= goal <= spread[1]:
            verdict = "tie"
        else:
            verdict = "missed"
        ahead: list[str] = []
        if row.get("best_of_peers") and verdict != "not measured":
            ahead, within_reach = _peers_ahead(row, higher)
            if ahead and verdict == "met":
                verdict = "tie" if within_reach else "missed"
            elif ahead and not within_reach:
                verdict = "missed"
        results.append(
            {
                "label": row["label"],
                "value": value,
                "unit": "x" if compared else row["unit"],
                "goal": goal,
                "higher_is_better": higher,
                "spread": spread,
                "verdict": verdict,
                "best_of_peers": bool(row.get("best_of_peers")),
                "behind": ahead,
            }
        )
    return results


def _peers_ahead(row: dict[str, Any], higher: bool) -> tuple[list[str], bool]:
    """The peers whose median beats duckpool's in ``row``, and whether
    duckpool's best rep beats every one of those medians."""
    cells = row["cells"]
    own = cells[_SUBJECT]

    def better(a: float, b: float) -> bool:
        return a > b if higher else a < b

    ahead = [
        name
        for name, cell in cells.items()
        if name != _SUBJECT
        and name not in _NOT_PEERS
        and cell.get("median") is not None
        and better(cell["median"], own["median"])
    ]
    best_rep = own.get("max" if higher else "min")
    reach = best_rep is not None and all(better(best_rep, cells[name]["median"]) for name in ahead)
    return ahead, reach


def _goal_text(result: dict[str, Any]) -> str:
    unit = result["unit"]
    sign = ">=" if result["higher_is_better"] else "<="
    text = f"{result['label']}: "
    text += "-" if result["value"] is None else _format_value(result["value"], unit)
    text += f" (goal {sign} {_format_value(result['goal'], unit)}"
    if result.get("best_of_peers"):
        text += ", and the best of every peer"
    if result["spread"] is not None:
        text += f"; reps {_format_range(result['spread'], unit)}"
    if result.get("behind"):
        text += f"; behind {', '.join(result['behind'])}"
    return text + ")"


def _goal_lines(results: list[dict[str, Any]], markdown: bool) -> list[str]:
    """The goals block under a table: a count, then one line per goal."""
    if not results:
        return []
    met = sum(result["verdict"] == "met" for result in results)
    lines = [f"{_SUBJECT}'s goals: {met} of {len(results)} met"]
    for result in results:
        line = f"{result['verdict']}: {_goal_text(result)}"
        lines.append(f"- {line}" if markdown else f"  {line}")
    return lines


def _goal_summary(runs: list[dict[str, Any]]) -> list[str]:
    """One line per table: the goals met, and the others by name."""
    lines = []
    for run in runs:
        results = run.get("goals") or []
        if not results:
            continue
        met = sum(result["verdict"] == "met" for result in results)
        others = [
            f"{result['verdict']} {result['label']}"
            for result in results
            if result["verdict"] != "met"
        ]
        line = f"{_method_text(run['start_method'])}: {met} of {len(results)} goals met"
        lines.append(line + (f" ({'; '.join(others)})" if others else ""))
    return lines


def _machine() -> dict[str, Any]:
    import platform

    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as stream:
            for line in stream:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        cpu = platform.processor()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "system": f"{platform.system()} {platform.machine()}",
        "cores": os.cpu_count(),
        "usable_cores": usable or os.cpu_count(),
        "cpu": cpu,
    }


def _report_lines(
    plan: _Plan,
    rows: list[dict[str, Any]],
    header: list[str],
    worker_start: dict[str, list[str]],
    markdown: bool,
) -> list[str]:
    """One table's report: header, skipped libraries, table, goals, legend, n/a cells, failures."""
    lines = [
        *header,
        "workers started by: "
        + ", ".join(f"{name} {'/'.join(found) or '?'}" for name, found in worker_start.items()),
        *(f"skipped {name}: {reason}" for name, reason in plan.skipped.items()),
    ]
    if markdown:  # one paragraph per line, the legend as a list
        lines = [line for text in lines for line in (text, "")]
        lines += _markdown_table(rows, plan.libraries)
        lines.append("")
        goals = _goal_lines(_goal_results(rows), markdown)
        lines += [*goals, ""] if goals else []
        lines += [f"- {name}: {LIBRARIES[name].description}" for name in plan.libraries]
    else:
        lines.append("")
        lines += _terminal_table(rows, plan.libraries)
        lines.append("")
        goals = _goal_lines(_goal_results(rows), markdown)
        lines += [*goals, ""] if goals else []
        lines += [f"{name} = {LIBRARIES[name].description}" for name in plan.libraries]
    first_rows = [  # once per metric
        row for row in rows if row["quantity"] == METRICS[row["metric"]].quantities[0].key
    ]
    not_applicable = [
        f"{_dash()} {row['metric']} {library}: does not apply ({summary['not_applicable']})"
        for row in first_rows
        for library, summary in row["cells"].items()
        if summary["not_applicable"]
    ]
    failures = [
        f"failed {row['metric']} {library}: {message}"
        for row in first_rows
        for library, summary in row["cells"].items()
        for message in summary["failures"]
    ]
    for extra in (not_applicable, failures):
        if extra:
            lines.append("")
            lines += [f"- {line}" if markdown else line for line in extra]
    return lines


def _document(
    plans: Sequence[_Plan],
    date: str,
    python: str,
    machine: dict[str, Any],
    runs: list[dict[str, Any]],
) -> dict[str, Any]:
    """The ``--json`` document: the run's header, then one entry per table in ``runs``."""
    first = plans[0]
    return {
        "schema": 3,
        "command": first.command,
        "date": date,
        "python": python,
        "machine": machine,
        "workers": first.workers,
        "reps": first.reps,
        "metric_reps": first.metric_reps,
        "baseline": _BASELINE,
        "libraries": list(first.libraries),
        "skipped": first.skipped,
        "runs": runs,
    }


def _write_json(path: str, document: dict[str, Any]) -> None:
    import json

    with open(path, "w", encoding="utf-8") as stream:
        json.dump(document, stream, indent=2)
        stream.write("\n")
