"""The promotion gate: a pure decision over metric dicts, no registry and no I/O.

A candidate release is promoted only if, on the gate group's metrics, it beats the
mean-shape baseline its own evaluation scored on the same objects (the floor), stays
within tolerance of the champion scored the same way, and meets any absolute limits.
:mod:`mar3d.registry` reads the numbers and moves the aliases; this module decides.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class GateConfig:
    """Candidate must beat the mean-shape baseline on every metric, and be no worse than
    the champion (within tolerance).

    The metrics are those of one evaluation ``group`` (``mar3d.evaluate``; default the
    held-out objects): ``metrics`` maps a metric name to ``"max"`` (higher is better) or
    ``"min"``, read as ``<group>/<metric>`` (``group: ""`` reads plain names).
    ``beat_baseline`` (default true) is the gate's floor: on each metric the candidate
    must be strictly better than the constant mean-shape prediction that its own
    evaluation scored on the same objects (``<group>/baseline/<metric>``, recorded by
    ``mar3d evaluate`` while ``EvalConfig.baseline`` is on). It applies with or without a
    champion, so even the first release of a registry has to show that it uses its input
    image; a release with no baseline numbers is refused. Turn it off
    (``--set gate.beat_baseline=false``) only for plumbing checks whose model is not meant
    to learn anything (the pipeline's ``smoke`` preset: 4 objects and a few steps).
    The champion's values must come from the **same objects scored the same way**: the
    champion scored inside the candidate's own evaluation (``mar3d evaluate
    --compare-to``, which the pipeline does), or the champion's own evaluation when its
    protocol fingerprint for the group equals the candidate's. Otherwise the gate refuses
    instead of comparing numbers measured on different objects.
    ``rel_tolerance`` is relative to the champion's value (0.05 = may be 5% worse).
    ``minimums``/``maximums`` are absolute floors/ceilings that also apply when there is
    no champion yet.
    """
    metrics: dict[str, str] = field(default_factory=lambda: {
        "f_score": "max", "chamfer": "min", "normal_consistency": "max"})
    group: str = "heldout_objects"
    rel_tolerance: float = 0.05
    minimums: dict[str, float] = field(default_factory=dict)
    maximums: dict[str, float] = field(default_factory=dict)
    beat_baseline: bool = True

    def key(self, metric: str) -> str:
        return f"{self.group}/{metric}" if self.group else metric

    def baseline_key(self, metric: str) -> str:
        """Where the candidate's evaluation records the mean-shape baseline's value."""
        return f"{self.group}/baseline/{metric}" if self.group else f"baseline/{metric}"

    def validate(self) -> None:
        if not self.metrics:
            raise ValueError("gate needs at least one metric")
        for name, direction in self.metrics.items():
            if direction not in ("max", "min"):
                raise ValueError(f"gate metric {name!r}: direction must be 'max' or 'min', got {direction!r}")
        if not (0.0 <= self.rel_tolerance < 1.0):
            raise ValueError(f"rel_tolerance must be in [0, 1), got {self.rel_tolerance}")


@dataclass
class GateCheck:
    metric: str
    direction: str
    candidate: float | None
    baseline: float | None   # the mean-shape baseline on the same objects (the floor)
    champion: float | None
    limit: float | None      # the champion's value less the tolerance (or the minimum/maximum missed)
    passed: bool
    why: str


@dataclass
class GateDecision:
    passed: bool
    checks: list[GateCheck]

    def table(self) -> str:
        rows = ["| metric | better | candidate | mean-shape baseline | champion | limit | ok | why |",
                "|---|---|---|---|---|---|---|---|"]
        fmt = lambda v: "-" if v is None else f"{v:.5g}"  # noqa: E731
        for c in self.checks:
            rows.append(f"| {c.metric} | {c.direction} | {fmt(c.candidate)} | {fmt(c.baseline)} | "
                        f"{fmt(c.champion)} | {fmt(c.limit)} | {'yes' if c.passed else 'NO'} | {c.why} |")
        return "\n".join(rows)


def evaluate_gate(candidate: dict[str, float], champion: dict[str, float] | None,
                  gate: GateConfig, champion_missing: str | None = None) -> GateDecision:
    """Pure decision function: compare metric dicts (``<group>/<metric>`` keys, see
    :meth:`GateConfig.key`) under the gate's rules. The mean-shape baseline is read from
    the candidate's own metrics (:meth:`GateConfig.baseline_key`). ``champion_missing``: a
    champion exists but has no comparable numbers (the reason) -- every check fails."""
    checks: list[GateCheck] = []
    for metric, direction in gate.metrics.items():
        name = gate.key(metric)
        cand = candidate.get(name)
        base = candidate.get(gate.baseline_key(metric))
        champ = None if champion is None else champion.get(name)
        values = {"metric": name, "direction": direction, "candidate": cand, "baseline": base,
                  "champion": champ}
        if champion_missing:
            checks.append(GateCheck(**values, limit=None, passed=False, why=champion_missing))
            continue
        if cand is None or not math.isfinite(cand):
            checks.append(GateCheck(**values, limit=None, passed=False,
                                    why="candidate has no finite value"))
            continue
        floor, ceil = gate.minimums.get(metric), gate.maximums.get(metric)
        if floor is not None and cand < floor:
            checks.append(GateCheck(**values, limit=floor, passed=False, why=f"below minimum {floor}"))
            continue
        if ceil is not None and cand > ceil:
            checks.append(GateCheck(**values, limit=ceil, passed=False, why=f"above maximum {ceil}"))
            continue
        failed: list[str] = []
        held: list[str] = []
        if gate.beat_baseline:
            beats, why = _versus_baseline(metric, direction, cand, base, gate.baseline_key(metric))
            (held if beats else failed).append(why)
        limit = None
        if champ is None or not math.isfinite(champ):
            held.append("no champion value")
        else:
            slack = gate.rel_tolerance * abs(champ)
            limit = champ - slack if direction == "max" else champ + slack
            if (cand >= limit) if direction == "max" else (cand <= limit):
                held.append("within tolerance of champion")
            else:
                failed.append("worse than champion beyond tolerance")
        checks.append(GateCheck(**values, limit=limit, passed=not failed, why="; ".join(failed + held)))
    return GateDecision(all(c.passed for c in checks), checks)


def _versus_baseline(metric: str, direction: str, cand: float, base: float | None,
                     key: str) -> tuple[bool, str]:
    """Whether ``cand`` is strictly better than the mean-shape baseline ``base``, and the
    sentence that says so (or by how much it is not)."""
    if base is None or not math.isfinite(base):
        return False, (f"no mean-shape baseline value ({key}) to beat: evaluate with the "
                       "baseline enabled (EvalConfig.baseline, `--set baseline=true`; it needs "
                       "training objects in the dataset's split), or set gate.beat_baseline=false")
    better = "above" if direction == "max" else "below"
    worse = "below" if direction == "max" else "above"
    gap = cand - base if direction == "max" else base - cand
    places = _places(abs(gap))
    num = lambda v: f"{v:.{places}f}"  # noqa: E731
    if gap > 0:
        return True, f"beats the mean-shape baseline {num(base)} by {num(gap)}"
    if gap == 0:
        return False, (f"{metric} {num(cand)} equals the mean-shape baseline {num(base)}: "
                       f"it must be strictly {better}")
    return False, f"{metric} {num(cand)} is {num(-gap)} {worse} the mean-shape baseline {num(base)}"


def _places(gap: float) -> int:
    """Decimal places that show ``gap``: 3, more for smaller gaps (0.00042 -> 4)."""
    if gap <= 0 or not math.isfinite(gap):
        return 3
    return min(12, max(3, -math.floor(math.log10(gap))))
