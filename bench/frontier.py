#!/usr/bin/env python3
"""The privacy-utility frontier of PRIVACY.md, as SVG, from `lsplit attack --table --csv FILE`.

Each defence setting is a point: its perplexity increase over the unsplit public model (x) and
the best attack's prompt-token recovery (y), both on the held-out prompts; filled when greedy
agreement is at least 90%. The shaded corner is the goal (perplexity within +10%, recovery
below 20%); the line joins the settings no other beats on both axes.

Written by hand in SVG (no plotting library) so that the figure needs nothing but python3:
    python3 bench/frontier.py table.csv > privacy-frontier.svg
"""

import csv
import math
import sys
from xml.sax.saxutils import escape

WIDTH, HEIGHT = 1130, 460
LEFT, RIGHT, TOP, BOTTOM = 70, 590, 30, 60
GOAL_PERPLEXITY, GOAL_RECOVERY, GOAL_AGREEMENT = 10.0, 20.0, 90.0


def read(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    points = []
    for r in rows:
        points.append(
            {
                "flags": r["flags"] or "(none)",
                "x": 100.0 * (float(r["perplexity_ratio"]) - 1.0),
                "y": float(r["best_prompt_percent"]),
                "agree": float(r["agreement_percent"]),
            }
        )
    return points


def frontier(points):
    """The points no other point beats on both axes (lower is better on each)."""
    best = []
    for p in sorted(points, key=lambda p: (p["x"], p["y"])):
        if not best or p["y"] < best[-1]["y"]:
            best.append(p)
    return best


def svg(points):
    # The x axis is logarithmic in (1 + increase%): settings span a few percent to many times.
    top_x = max(max(p["x"] for p in points), GOAL_PERPLEXITY * 2)
    lx = lambda v: math.log10(1.0 + max(v, 0.0))
    span = lx(top_x)
    sx = lambda v: LEFT + (WIDTH - LEFT - RIGHT) * lx(v) / span
    sy = lambda v: TOP + (HEIGHT - TOP - BOTTOM) * (1.0 - v / 100.0)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<rect x="{sx(0)}" y="{sy(GOAL_RECOVERY)}" width="{sx(GOAL_PERPLEXITY) - sx(0)}" '
        f'height="{sy(0) - sy(GOAL_RECOVERY)}" fill="#c8f0c8"/>',
        f'<text x="{sx(0) + 4}" y="{sy(0) - 6}" fill="#206020">goal</text>',
        f'<line x1="{sx(0)}" y1="{sy(0)}" x2="{sx(top_x)}" y2="{sy(0)}" stroke="black"/>',
        f'<line x1="{sx(0)}" y1="{sy(0)}" x2="{sx(0)}" y2="{sy(100)}" stroke="black"/>',
    ]
    for v in [0, 20, 40, 60, 80, 100]:
        out.append(f'<text x="{sx(0) - 6}" y="{sy(v) + 4}" text-anchor="end">{v}%</text>')
    for v in [0, 1, 10, 100, 1000, 10000]:
        if v <= top_x:
            out.append(f'<text x="{sx(v)}" y="{sy(0) + 16}" text-anchor="middle">+{v}%</text>')
    out.append(
        f'<text x="{(sx(0) + sx(top_x)) / 2}" y="{HEIGHT - 15}" text-anchor="middle">'
        "perplexity increase over the unsplit model (held-out prompts, log scale)</text>"
    )
    out.append(
        f'<text transform="translate(16,{(sy(0) + sy(100)) / 2}) rotate(-90)" '
        'text-anchor="middle">best attack: prompt tokens recovered</text>'
    )
    line = " ".join(f"{sx(p['x']):.1f},{sy(p['y']):.1f}" for p in frontier(points))
    out.append(f'<polyline points="{line}" fill="none" stroke="#888" stroke-dasharray="4 3"/>')
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
               "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#000000", "#aa0066"]
    for i, p in enumerate(points):
        colour = palette[i % len(palette)]
        fill = colour if p["agree"] >= GOAL_AGREEMENT else "white"
        out.append(
            f'<circle cx="{sx(p["x"]):.1f}" cy="{sy(p["y"]):.1f}" r="5" fill="{fill}" '
            f'stroke="{colour}" stroke-width="2"/>'
        )
        ly = TOP + 14 * i
        out.append(
            f'<circle cx="{WIDTH - RIGHT + 20}" cy="{ly}" r="4" fill="{fill}" stroke="{colour}" '
            'stroke-width="2"/>'
        )
        out.append(
            f'<text x="{WIDTH - RIGHT + 30}" y="{ly + 4}">{escape(p["flags"])}</text>'
        )
    out.append(
        f'<text x="{WIDTH - RIGHT + 14}" y="{TOP + 14 * len(points) + 14}">'
        "filled: greedy agreement &gt;= 90%</text>"
    )
    out.append("</svg>")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: frontier.py TABLE.csv > frontier.svg")
    sys.stdout.write(svg(read(sys.argv[1])))
