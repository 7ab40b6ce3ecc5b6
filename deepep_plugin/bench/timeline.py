"""Where a forward step's time goes, from the timelines ``compare --trace-dir DIR`` writes.

``python -m deepep_plugin.bench timeline DIR [--json OUT]``

Each file ``<lib>_R<ranks>_T<tokens>_S<sms>_r<rank>.json`` holds one rank's profile of back-to-back forward steps
(layout + fresh dispatch + combine): the ``step::layout`` / ``step::dispatch`` / ``step::combine`` host ranges, the
launch calls and every GPU activity with the correlation id that ties it to its launch, all on the host clock that the
processes of a machine share. Per library and configuration this prints the median over steps (the first step
left out) of:

* host us of each call, and the step's period on the host and on the GPU;
* GPU us of each kernel class (layout, notify, dispatch, combine; DeepEP's ``cached_notify_combine`` counts as
  ``notify_combine``);
* ``count_gap``: GPU time between the end of notify and the start of dispatch on a rank (the receive-count read on
  the host, the allocation and the launch); with a split launch (``DEEPEP_PLUGIN_EARLY_DISPATCH=1``) the senders'
  part starts at once, and ``split_gap`` is the GPU time between the end of that part and the start of the rest;
  a class's kernel us is then the sum of its kernels;
* ``launch_to_start`` of dispatch: from its launch call to its start on the GPU (the queue ahead of it);
* ``notify_start_skew`` / ``notify_end_skew``: how far apart the ranks start and end their notify (a late rank makes
  the others wait inside it);
* per rank (a second table): ``host_chain``, the host's own work per step, from its notify's end (the receive
  counts) to its next notify's launch, and its host us per call: in a host-bound step the rank with the longest
  chain sets the period.
"""

from __future__ import annotations

import argparse
import bisect
import glob
import json
import os
import re
import statistics
from typing import Any, Optional

_NAME = re.compile(r"^(?P<lib>.+)_R(?P<ranks>\d+)_T(?P<tokens>\d+)_S(?P<sms>\d+)_r(?P<rank>\d+)\.json$")
KINDS = ("layout", "notify", "dispatch", "notify_combine", "combine")


def kernel_kind(name: str) -> Optional[str]:
    """The class of a GPU activity by its (demangled) name, or None for anything else (copies, fills)."""
    low = name.lower()
    if low.startswith("step::"):
        return None  # the GPU mirror of a host range (record_function), not a kernel
    if "notify" in low:
        return "notify_combine" if "combine" in low else "notify"
    for kind in ("layout", "combine", "dispatch"):
        if kind in low:
            return kind
    return None


def _steps(cpu: list[list[Any]]) -> list[dict[str, tuple[float, float]]]:
    """Per step, its host ranges ``{"layout": (start, end), ...}``, steps cut at each ``step::layout``."""
    steps: list[dict[str, tuple[float, float]]] = []
    for name, start, dur, _corr in cpu:
        if not name.startswith("step::"):
            continue
        part = name[len("step::"):]
        if part == "layout":
            steps.append({})
        if steps:
            steps[-1][part] = (start, start + dur)
    return steps


def rank_steps(trace: dict[str, list[list[Any]]]) -> list[dict[str, float]]:
    """One rank's per-step numbers (us; absolute starts kept under ``t_*`` for the cross-rank figures)."""
    cpu, gpu = trace["cpu"], trace["gpu"]
    steps = _steps(cpu)
    launch_at = {corr: start for name, start, _dur, corr in cpu if not name.startswith("step::")}
    starts = [s["layout"][0] for s in steps]
    out: list[dict[str, float]] = [{} for _ in steps]
    # Per step and class, its kernels in start order: (launch, start, end). A split-launch dispatch has two.
    kernels: list[dict[str, list[tuple[float, float, float]]]] = [{} for _ in steps]
    for name, start, dur, corr in gpu:
        kind = kernel_kind(name)
        launched = launch_at.get(corr)
        if kind is None or launched is None:
            continue
        i = bisect.bisect_right(starts, launched) - 1  # the last step begun before the launch
        if i >= 0:
            kernels[i].setdefault(kind, []).append((launched, start, start + dur))
    for i, by_kind in enumerate(kernels):
        for kind, ks in by_kind.items():
            ks.sort(key=lambda k: k[1])
            out[i][f"t_{kind}_launch"] = ks[0][0]
            out[i][f"t_{kind}_start"] = ks[0][1]
            out[i][f"t_{kind}_end"] = ks[-1][2]
            out[i][f"gpu_{kind}_us"] = sum(end - start for _, start, end in ks)
            out[i][f"launch_to_start_{kind}_us"] = ks[0][1] - ks[0][0]
            if kind == "dispatch" and len(ks) > 1:  # split launch: the GPU idle before the second part
                out[i]["split_gap_us"] = ks[1][1] - ks[0][2]
    for i, s in enumerate(steps):
        row = out[i]
        for part in ("layout", "dispatch", "combine"):
            if part in s:
                row[f"host_{part}_us"] = s[part][1] - s[part][0]
        if i + 1 < len(steps):
            row["host_period_us"] = starts[i + 1] - starts[i]
            if "t_layout_start" in row and "t_layout_start" in out[i + 1]:
                row["gpu_period_us"] = out[i + 1]["t_layout_start"] - row["t_layout_start"]
        if "t_notify_end" in row and "t_dispatch_start" in row:
            row["count_gap_us"] = row["t_dispatch_start"] - row["t_notify_end"]
        if i + 1 < len(steps) and "t_notify_end" in row and "t_notify_launch" in out[i + 1]:
            # The host's own chain per step: from the receive counts (its notify's end) through the dispatch
            # launch, combine, the next layout and the next dispatch's checks to the next notify's launch. In a
            # host-bound step the rank whose chain is longest sets the period; the others wait in notify.
            row["host_chain_us"] = out[i + 1]["t_notify_launch"] - row["t_notify_end"]
    return out


PER_RANK = ("host_chain_us", "host_layout_us", "host_dispatch_us", "host_combine_us", "gpu_notify_us")


def summarize(traces: dict[int, dict[str, list[list[Any]]]]) -> dict[str, float]:
    """Medians over steps (the first left out) of every per-rank number (mean over ranks) and of the ranks'
    notify start and end skews."""
    per_rank = {r: rank_steps(t) for r, t in sorted(traces.items())}
    n = min(len(s) for s in per_rank.values())
    summary: dict[str, float] = {}
    keys = sorted({k for s in per_rank.values() for row in s for k in row if not k.startswith("t_")})
    for key in keys:
        values = [statistics.mean(vals) for i in range(1, n)
                  if (vals := [s[i][key] for s in per_rank.values() if key in s[i]])]
        if values:
            summary[key] = statistics.median(values)
    for edge in ("start", "end") if len(per_rank) > 1 else ():
        skews = []
        for i in range(1, n):
            t = [s[i].get(f"t_notify_{edge}") for s in per_rank.values()]
            if all(v is not None for v in t):
                skews.append(max(t) - min(t))
        if skews:
            summary[f"notify_{edge}_skew_us"] = statistics.median(skews)
    for r, s in per_rank.items():  # per rank: which one is slow, and in which call
        for key in PER_RANK:
            values = [s[i][key] for i in range(1, n) if key in s[i]]
            if values:
                summary[f"r{r}_{key}"] = statistics.median(values)
    summary["steps"] = float(max(n - 1, 0))
    return summary


def load(directory: str) -> dict[tuple[str, int, int, int], dict[int, dict[str, list[list[Any]]]]]:
    """``{(lib, ranks, tokens, sms): {rank: trace}}`` of every timeline file in ``directory``."""
    found: dict[tuple[str, int, int, int], dict[int, dict[str, list[list[Any]]]]] = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        m = _NAME.match(os.path.basename(path))
        if m is None:
            continue
        key = (m["lib"], int(m["ranks"]), int(m["tokens"]), int(m["sms"]))
        with open(path) as f:
            found.setdefault(key, {})[int(m["rank"])] = json.load(f)
    return found


_COLUMNS = ("host_period_us", "gpu_period_us", "host_layout_us", "host_dispatch_us", "host_combine_us",
            "gpu_notify_us", "gpu_dispatch_us", "gpu_combine_us", "count_gap_us", "split_gap_us",
            "launch_to_start_dispatch_us",
            "notify_start_skew_us", "notify_end_skew_us")


def table(summaries: dict[tuple[str, int, int, int], dict[str, float]]) -> str:
    """One line per configuration and library: the columns above (us)."""
    head = "lib            R     T  SMs " + " ".join(f"{c.replace('_us', ''):>12.12s}" for c in _COLUMNS)
    lines = [head]
    for (lib, ranks, tokens, sms), s in sorted(summaries.items(), key=lambda kv: (kv[0][1:], kv[0][0])):
        cells = " ".join(f"{s[c]:12.1f}" if c in s else f"{'-':>12s}" for c in _COLUMNS)
        lines.append(f"{lib:14.14s} {ranks:1d} {tokens:5d} {sms:4d} {cells}")
    return "\n".join(lines)


def rank_table(summaries: dict[tuple[str, int, int, int], dict[str, float]]) -> str:
    """One line per configuration, library and rank: the PER_RANK medians (us)."""
    lines = ["lib            R     T  SMs rank " + " ".join(f"{c.replace('_us', ''):>12.12s}" for c in PER_RANK)]
    for (lib, ranks, tokens, sms), s in sorted(summaries.items(), key=lambda kv: (kv[0][1:], kv[0][0])):
        for r in range(ranks):
            if not any(f"r{r}_{c}" in s for c in PER_RANK):
                continue
            cells = " ".join(f"{s[f'r{r}_{c}']:12.1f}" if f"r{r}_{c}" in s else f"{'-':>12s}" for c in PER_RANK)
            lines.append(f"{lib:14.14s} {ranks:1d} {tokens:5d} {sms:4d} {r:4d} {cells}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m deepep_plugin.bench timeline", description=__doc__.split("\n")[0])
    p.add_argument("directory", help="the --trace-dir of a compare run")
    p.add_argument("--json", type=str, default="", help="also write the summaries here")
    args = p.parse_args(argv)
    found = load(args.directory)
    if not found:
        raise SystemExit(f"timeline: no <lib>_R<ranks>_T<tokens>_S<sms>_r<rank>.json files in {args.directory}")
    summaries = {key: summarize(traces) for key, traces in found.items()}
    print(table(summaries))
    print()
    print(rank_table(summaries))
    if args.json:
        rows = [{"lib": k[0], "ranks": k[1], "tokens": k[2], "num_sms": k[3], **v} for k, v in summaries.items()]
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=1)
