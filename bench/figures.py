"""The figures of docs/performance.md, drawn with matplotlib from a results JSON (what ``python -m bench`` writes).

Each figure is one function of the results that returns a :class:`Figure`, or None when the run did not measure
what it shows (``--only signing`` draws no forward figure). :class:`Figure` objects are made directly, without
pyplot: no global figure state, and PNGs are rendered by the Agg canvas, which needs no display. The PNGs carry
no version or date, so that a figure changes only when its data does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

_PROFILES = (("default", "agent, default settings", "tab:orange"),
             ("throughput", "agent, throughput profile", "tab:green"))
_BASELINE = "tab:blue"


@dataclasses.dataclass(frozen=True)
class Drawn:
    file: str  # the PNG's name, in the figures directory
    caption: str


def _data(results: Mapping[str, Any], bench: str, key: str) -> list[dict[str, Any]]:
    """One benchmark's rows (``results[bench].data[key]``); none when that benchmark did not run."""
    rows = results.get("results", {}).get(bench, {}).get("data", {}).get(key, [])
    return [row for row in rows if isinstance(row, dict)] if isinstance(rows, list) else []


def _figure(panels: int, width: float = 5.2) -> tuple[Figure, list[Axes]]:
    figure = Figure(figsize=(width * panels, 3.8), dpi=100, layout="constrained")
    return figure, list(figure.subplots(1, panels, squeeze=False)[0])


def _by_alg(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(str(row["alg"]), []).append(row)
    return {alg: sorted(found, key=lambda r: int(r["clients"])) for alg, found in grouped.items()}


def _clients_axis(axes: Axes, clients: Sequence[int]) -> None:
    axes.set_xscale("log", base=2)
    axes.set_xticks(list(clients), [str(c) for c in clients])
    axes.set_xlabel("concurrent clients")
    axes.grid(True, which="major", alpha=0.3)


Panel = Callable[[Axes, str, list[dict[str, Any]], list[int]], None]  # axes, alg, rows, clients


def _per_alg(results: Mapping[str, Any], panel: Panel) -> Figure | None:
    """One panel per signature algorithm of the signing benchmark, its x axis the concurrent clients."""
    groups = _by_alg(_data(results, "signing", "signing"))
    if not groups:
        return None
    figure, panels = _figure(len(groups))
    for axes, (alg, rows) in zip(panels, groups.items(), strict=True):
        clients = [int(r["clients"]) for r in rows]
        panel(axes, alg, rows, clients)
        _clients_axis(axes, clients)
    panels[0].legend(loc="best", fontsize="small")
    return figure


def _rate_panel(axes: Axes, alg: str, rows: list[dict[str, Any]], clients: list[int]) -> None:
    axes.plot(clients, [r["raw_rate"] for r in rows], "o--", color=_BASELINE, label="python-pkcs11 in-process")
    for profile, label, color in _PROFILES:
        axes.plot(clients, [r[profile]["rate"] for r in rows], "o-", color=color, label=label)
    axes.set_ylim(bottom=0)
    axes.set_title(f"{alg}: signatures per second")
    axes.set_ylabel("signatures/s")


def _latency_panel(axes: Axes, alg: str, rows: list[dict[str, Any]], clients: list[int]) -> None:
    for profile, label, color in _PROFILES:
        if all("p50_ms" in r[profile] for r in rows):
            axes.plot(clients, [r[profile]["p50_ms"] for r in rows], "o:", color=color, label=f"{label}, p50")
        axes.plot(clients, [r[profile]["p99_ms"] for r in rows], "o-", color=color, label=f"{label}, p99")
    axes.set_yscale("log")
    axes.set_title(f"{alg}: latency over the socket")
    axes.set_ylabel("ms (log scale)")


def signing_rate(results: Mapping[str, Any]) -> Figure | None:
    return _per_alg(results, _rate_panel)


def signing_latency(results: Mapping[str, Any]) -> Figure | None:
    return _per_alg(results, _latency_panel)


Series = tuple[str, str, Sequence[float]]  # label, colour, one value per group


def _bar_figure(width: float, groups: Sequence[str], series: Sequence[Series], title: str, unit: str) -> Figure:
    """Grouped bars: one group per label in ``groups``, one bar per series; the legend right of the bars (inside,
    it would hide the tallest)."""
    figure, [axes] = _figure(1, width)
    bar = 0.8 / len(series)
    for number, (label, color, values) in enumerate(series):
        offset = (number - (len(series) - 1) / 2) * bar
        axes.bar([g + offset for g in range(len(groups))], values, bar, label=label, color=color)
    axes.set_xticks(range(len(groups)), list(groups))
    axes.grid(True, axis="y", alpha=0.3)
    axes.set_title(title)
    axes.set_ylabel(unit)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    return figure


def _agents(rows: Sequence[dict[str, Any]]) -> list[Series]:
    return [(label, color, [r[profile]["rate"] for r in rows]) for profile, label, color in _PROFILES]


def network_hsm(results: Mapping[str, Any]) -> Figure | None:
    rows = _data(results, "network-hsm", "network_hsm")
    if not rows:
        return None
    latency = rows[0].get("latency_ms")
    return _bar_figure(9.0, [f"{r['alg']}\n{r['clients']} clients" for r in rows],
                       [("sessions ÷ latency (the HSM's limit)", "lightgray", [r["ideal"] for r in rows]),
                        ("python-pkcs11 in-process", _BASELINE, [r["raw_rate"] for r in rows]), *_agents(rows)],
                       "A network HSM" + (f" ({latency:.1f} ms per signature)" if latency else "")
                       + ": signatures per second", "signatures/s")


def forward(results: Mapping[str, Any]) -> Figure | None:
    rows = _data(results, "forward", "forward")
    if not rows:
        return None
    return _bar_figure(7.5, [f"{r['clients']} client{'s' if int(r['clients']) != 1 else ''}" for r in rows],
                       [("urllib3, key in memory", _BASELINE, [r["urllib3_rate"] for r in rows]), *_agents(rows)],
                       "mTLS calls to the model bank per second", "calls/s")


def handshakes(results: Mapping[str, Any]) -> Figure | None:
    rows = _data(results, "handshakes", "handshakes")
    if not rows:
        return None
    return _bar_figure(7.5, [f"OpenSSL {r['backend']}" for r in rows],
                       [("client key in memory", _BASELINE, [r["memory"] for r in rows]),
                        ("client key on the token", "tab:green", [r["token"] for r in rows])],
                       "Full mTLS handshakes per second (TLS 1.3, RSA-2048)", "handshakes/s")


FIGURES: tuple[tuple[str, str, Callable[[Mapping[str, Any]], Figure | None]], ...] = (
    ("signing-rate.png", "Signatures per second over the socket, next to python-pkcs11 in-process", signing_rate),
    ("signing-latency.png", "Signing latency over the socket (p50 dotted, p99 solid)", signing_latency),
    ("network-hsm.png", "A network HSM: the agent against the HSM's own limit", network_hsm),
    ("forward.png", "mTLS calls through the agent, next to urllib3 with the key in memory", forward),
    ("handshakes.png", "Full mTLS handshakes with the token key, next to an in-memory key", handshakes),
)


def draw(results: Mapping[str, Any], directory: Path) -> list[Drawn]:
    """Write the PNG of every figure the results have data for into ``directory``; what was drawn, in order.
    A figure the results have no data for is removed, so that the page never shows another run's."""
    directory.mkdir(parents=True, exist_ok=True)
    drawn = []
    for name, caption, make in FIGURES:
        figure = make(results)
        target = directory / name
        if figure is None:
            target.unlink(missing_ok=True)
            continue
        figure.savefig(target, format="png", metadata={"Software": None})
        drawn.append(Drawn(name, caption))
    return drawn


def markdown(drawn: Sequence[Drawn], folder: str) -> str:
    """The figures as Markdown images, ``folder`` relative to the page."""
    return "\n".join(f"![{d.caption}]({folder}/{d.file})\n\n*{d.caption}.*\n" for d in drawn)
