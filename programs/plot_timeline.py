"""Draw a Chrome trace written by ``programs/transformer.py --trace FILE.json`` as a PNG.

    mpirun -n 4 python programs/transformer.py --pp 4 --prefill-chunks 4 \\
        --prompt-ids 1,2,...  --trace run.json
    python programs/plot_timeline.py run.json -o run.png [--until-ms 400]

One row per rank (world rank 0 on top), three lanes in each row:
  forward   the stage spans ("forward N tokens"), coloured by their order on the rank:
            the i-th forward of every rank is the same chunk (or decode step), so with
            pipeline stages and prefill chunks the same colour steps down the rows
            diagonally, one stage later each;
  compute   attention and MLP spans;
  comm      every communication kind (tp_allreduce, pp_send, pp_recv, ep_dispatch,
            ...) in its own colour; a receive that waits shows how long the stage idled,
            and a non-blocking send (pp_send) lasts from its isend to the wait that
            completes it, so it overlaps the compute of the next chunk.

Needs matplotlib (the optional extra ``plot``: pip install mpipar[plot]).
"""

from __future__ import annotations

import argparse
import json
import sys

LANES = (("forward", 0.66, 0.30), ("compute", 0.34, 0.30), ("comm", 0.02, 0.30))
COMPUTE_COLOURS = {"attention": "#4c72b0", "mlp": "#55a868"}
COMM_COLOURS = ["#c44e52", "#dd8452", "#8172b3", "#937860", "#da8bc3", "#8c8c8c",
                "#ccb974", "#64b5cd", "#b8860b", "#2f4f4f"]


def load(path: str) -> tuple[dict, list]:
    """-> ({pid: row name}, [(pid, name, cat, start_ms, dur_ms)])."""
    with open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    names, spans = {}, []
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            names[e["pid"]] = e.get("args", {}).get("name", f"rank {e['pid']}")
        elif e.get("ph") == "X":
            spans.append((e["pid"], e["name"], e.get("cat", ""), e["ts"] / 1e3,
                          e.get("dur", 0.0) / 1e3))
    for pid, *_ in spans:
        names.setdefault(pid, f"rank {pid}")
    return names, spans


def lane_of(name: str, cat: str) -> str:
    if cat == "comm":
        return "comm"
    if cat == "stage" or name.startswith("forward"):
        return "forward"
    return "compute"


def plot(names: dict, spans: list, out: str, title: str, until_ms: float | None = None,
         width: float = 14.0) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if until_ms is not None:
        spans = [s for s in spans if s[3] <= until_ms]
    pids = sorted(names)
    row = {pid: len(pids) - 1 - i for i, pid in enumerate(pids)}  # rank 0 on top
    comm_kinds = sorted({s[1] for s in spans if s[2] == "comm"})
    colour = {k: COMM_COLOURS[i % len(COMM_COLOURS)] for i, k in enumerate(comm_kinds)}
    colour.update(COMPUTE_COLOURS)
    cmap = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(width, 0.9 + 0.75 * len(pids)))
    order = {pid: 0 for pid in pids}
    bars: dict = {}  # (y, height, colour) -> [(start, dur)]
    labels = []
    for pid, name, cat, t0, dur in sorted(spans, key=lambda s: (s[0], s[3])):
        lane = lane_of(name, cat)
        y0, hgt = dict((n, (y, h)) for n, y, h in LANES)[lane]
        y = row[pid] + y0
        if lane == "forward":
            i = order[pid]
            order[pid] += 1
            c = cmap(i % 20)
            labels.append((t0 + dur / 2, y + hgt / 2, name.split()[1] if " " in name else ""))
        elif lane == "compute":
            c = COMPUTE_COLOURS.get(name.split()[0], "#999999")
        else:
            c = colour[name]
        bars.setdefault((y, hgt, c), []).append((t0, max(dur, 1e-3)))
    for (y, hgt, c), xs in bars.items():
        ax.broken_barh(xs, (y, hgt), facecolors=c, edgecolors="none")
    xmax = max((t0 + d for *_, t0, d in spans), default=1.0)
    for x, y, text in labels:  # token count of a forward, where it fits
        if text:
            ax.text(x, y, text, ha="center", va="center", fontsize=6, clip_on=True)
    ax.set_yticks([row[p] + 0.5 for p in pids])
    ax.set_yticklabels([names[p] for p in pids], fontsize=8)
    ax.set_ylim(0, len(pids))
    ax.set_xlim(0, xmax * 1.01)
    ax.set_xlabel("time (ms)")
    for p in pids:
        ax.axhline(row[p], color="#dddddd", linewidth=0.6)
    ax.set_title(title + "   (lanes per rank: forward # tokens / compute / comm)", fontsize=10)
    handles = [Patch(color=COMPUTE_COLOURS["attention"], label="attention"),
               Patch(color=COMPUTE_COLOURS["mlp"], label="mlp"),
               Patch(color=cmap(0), label="forward (colour = chunk/step #)")]
    handles += [Patch(color=colour[k], label=k) for k in comm_kinds]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8,
              frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", help="Chrome trace JSON from --trace")
    p.add_argument("-o", "--output", required=True, metavar="FILE.png")
    p.add_argument("--title", help="default: the trace file name")
    p.add_argument("--until-ms", type=float, help="draw only spans starting before this")
    p.add_argument("--width", type=float, default=14.0, help="inches")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: plot_timeline needs matplotlib: pip install 'mpipar[plot]'",
              file=sys.stderr)
        return 2
    try:
        names, spans = load(args.trace)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {args.trace}: not a Chrome trace ({e})", file=sys.stderr)
        return 2
    if not spans:
        print(f"error: {args.trace}: no spans", file=sys.stderr)
        return 2
    plot(names, spans, args.output, args.title or args.trace, args.until_ms, args.width)
    print(f"wrote {args.output}: {len(names)} ranks, {len(spans)} spans")
    return 0


if __name__ == "__main__":
    sys.exit(main())
