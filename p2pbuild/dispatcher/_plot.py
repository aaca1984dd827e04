"""The node page's plot: a node's rating over time, replayed from its logged observations
and drawn as a small SVG on the server (no plotting service, no JavaScript)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ._db import HeartbeatRow, ObservationRow
from ._ratings import Decayed, RatingModel, Signal, combine, mtbf_score

__all__ = ["rating_history", "rating_svg"]


def rating_history(
    observations: Sequence[ObservationRow], beat: HeartbeatRow | None, priors: Mapping[str, float],
    model: RatingModel, *, points: int = 200,
) -> list[dict[str, float]]:
    """The node's score after each observation, replaying its decayed sums (at most
    ``points`` points, evenly thinned). Reliability is today's for every point (heartbeats
    are not logged one by one), and the success and agreement priors are today's
    population means, so the last point equals the node's current score."""
    half = model.half_life_s
    sums = {s.value: Decayed() for s in Signal}
    if beat is not None:
        _, reliability = mtbf_score(beat.up_s, beat.failures, model)
    else:
        _, reliability = mtbf_score(0.0, 0.0, model)
    series = []
    for obs in observations:
        sums[obs.kind] = sums.get(obs.kind, Decayed(at=obs.at)).add(obs.value, obs.at, half)
        at = obs.at
        success = sums[Signal.SUCCESS.value].mean(at, half, priors.get("success", 0.9),
                                                  model.prior_weight)
        agreement = sums[Signal.AGREEMENT.value].mean(at, half, priors.get("agreement", 0.9),
                                                      model.prior_weight)
        speed = min(1.0, math.exp(-sums[Signal.SPEED.value].mean(
            at, half, 0.0, model.speed_prior_weight)))
        series.append({"at": at, "score": combine(success, agreement, speed, reliability),
                       "success": success, "agreement": agreement})
    if len(series) > points:
        step = len(series) / points
        series = [series[int(i * step)] for i in range(points - 1)] + [series[-1]]
    return series


def rating_svg(series: Sequence[Mapping[str, float]], width: int = 480,
               height: int = 140) -> str:
    """A small line chart of the score (and agreement) over time, as SVG text. Only
    numbers go into it, so it is safe to embed unescaped."""
    pad_l, pad_r, pad_t, pad_b = 34, 8, 8, 20
    w, h = width - pad_l - pad_r, height - pad_t - pad_b
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="rating over time">',
        f'<rect x="{pad_l}" y="{pad_t}" width="{w}" height="{h}" fill="#fafafa" '
        'stroke="#ccc"/>',
    ]
    for value in (0.0, 0.5, 1.0):
        y = pad_t + h * (1 - value)
        parts.append(f'<line x1="{pad_l}" y1="{y:.1f}" x2="{pad_l + w}" y2="{y:.1f}" '
                     'stroke="#e3e3e3"/>')
        parts.append(f'<text x="{pad_l - 4}" y="{y + 4:.1f}" font-size="10" '
                     f'text-anchor="end" fill="#555">{value:.1f}</text>')
    if not series:
        parts.append(f'<text x="{pad_l + w / 2}" y="{pad_t + h / 2}" font-size="12" '
                     'text-anchor="middle" fill="#777">no observations yet</text>')
    else:
        t0, t1 = series[0]["at"], series[-1]["at"]
        span = (t1 - t0) or 1.0

        def line(key: str, colour: str, dash: str = "") -> str:
            coords = " ".join(
                f"{pad_l + w * ((p['at'] - t0) / span if t1 > t0 else 0.5):.1f},"
                f"{pad_t + h * (1 - max(0.0, min(1.0, p[key]))):.1f}"
                for p in series
            )
            extra = f' stroke-dasharray="{dash}"' if dash else ""
            return (f'<polyline points="{coords}" fill="none" stroke="{colour}" '
                    f'stroke-width="2"{extra}/>')

        parts.append(line("agreement", "#9c6ade", "4 3"))
        parts.append(line("score", "#1f6feb"))
        parts.append(f'<text x="{pad_l}" y="{height - 5}" font-size="10" fill="#555">'
                     f'{len(series)} observations</text>')
        parts.append(f'<text x="{pad_l + w}" y="{height - 5}" font-size="10" '
                     'text-anchor="end" fill="#555">latest</text>')
    parts.append("</svg>")
    return "".join(parts)
