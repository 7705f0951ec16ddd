"""The dashboard's activity chart as inline SVG, drawn on the server: no
script and no CDN, so it works on a portal that runs offline."""
from __future__ import annotations

from typing import Any

from markupsafe import Markup, escape

from ckan.plugins import toolkit

WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 760, 220, 44, 44, 12, 28


def activity_svg(hours: list[dict[str, Any]]) -> Markup:
    """Bars: deliveries per hour (left axis); line: success rate (right axis)."""
    _ = toolkit._
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    peak = max([h["attempts"] for h in hours] + [1])
    step = plot_w / max(len(hours), 1)
    bars, points = [], []
    for i, hour in enumerate(hours):
        x = LEFT + i * step
        attempts, successes = hour["attempts"], hour["successes"]
        height = plot_h * attempts / peak
        rate = successes / attempts if attempts else None
        label = _("%(hour)s UTC: %(attempts)d deliveries, %(rate)s successful") % {
            "hour": hour["hour"][:13].replace("T", " ") + ":00", "attempts": attempts,
            "rate": f"{rate:.0%}" if rate is not None else "-"}
        bars.append(
            f'<rect class="webhooks-bar" x="{x:.1f}" y="{TOP + plot_h - height:.1f}" '
            f'width="{max(step - 1, 1):.1f}" height="{height:.1f}" fill="#206b82">'
            f"<title>{escape(label)}</title></rect>")
        if rate is not None:
            points.append((x + step / 2, TOP + plot_h * (1 - rate)))
    ticks = []
    for i in range(0, len(hours), 24):  # one tick per day, at 00:00 UTC or the start
        x = LEFT + i * step
        ticks.append(f'<text x="{x:.1f}" y="{HEIGHT - 8}" font-size="11">'
                     f'{escape(hours[i]["hour"][5:10])}</text>')
    # A line through the hours with deliveries, and a dot on each (one hour alone
    # would be no line at all).
    line = (f'<polyline class="webhooks-rate" fill="none" stroke="#c0392b" stroke-width="1.5" '
            f'points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in points)}"/>'
            + "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="#c0392b"/>'
                      for x, y in points)) if points else ""
    title = _("Deliveries per hour (bars, left axis) and success rate "
              "(line, right axis) over the last %d days") % (len(hours) // 24)
    return Markup(
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" class="webhooks-chart" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" aria-label="{escape(title)}">'
        f"<title>{escape(title)}</title>"
        f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - RIGHT}" y2="{TOP + plot_h}" '
        f'stroke="#999"/>'
        f'<text x="4" y="{TOP + 10}" font-size="11">{peak}</text>'
        f'<text x="4" y="{TOP + plot_h}" font-size="11">0</text>'
        f'<text x="{WIDTH - RIGHT + 4}" y="{TOP + 10}" font-size="11">100%</text>'
        f'<text x="{WIDTH - RIGHT + 4}" y="{TOP + plot_h}" font-size="11">0%</text>'
        + "".join(bars) + line + "".join(ticks) + "</svg>")


def daily_totals(hours: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same numbers per day (UTC), for the table beside the chart."""
    days: dict[str, dict[str, Any]] = {}
    for hour in hours:
        day = days.setdefault(hour["hour"][:10], {"day": hour["hour"][:10],
                                                   "attempts": 0, "successes": 0})
        day["attempts"] += hour["attempts"]
        day["successes"] += hour["successes"]
    for day in days.values():
        day["success_rate"] = day["successes"] / day["attempts"] if day["attempts"] else None
    return list(days.values())
