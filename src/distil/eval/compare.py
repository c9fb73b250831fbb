"""Verdicts from paired numbers: one rule for the study and the demos.

    judge(student_losses, ce_losses, a_label="forward KL", b_label="CE only")
    # {"verdict": "inconclusive", "rule": "one_seed", "why": "one seed: no run-to-run spread", ...}
    mc_chance(0.236, 100)   # True: 0.236 is within 2 binomial SE (0.087) of 0.25
"""

from __future__ import annotations

import math
import statistics

from distil.errors import DistilError

__all__ = ["judge", "mc_chance"]


def mc_chance(acc: float, n: int, chance: float = 0.25) -> bool:
    """Whether a multiple-choice accuracy over ``n`` items is indistinguishable from guessing:
    within 2 binomial standard errors of ``chance`` (or below it)."""
    if n <= 0:
        return True
    return acc <= chance + 2 * math.sqrt(chance * (1 - chance) / n)


def judge(a: list[float], b: list[float], *, kind: str = "less", tolerance: float = 0.02, a_label: str = "a",
          b_label: str = "b") -> dict:
    """Verdict for the finding "a is lower than b" (``kind="less"``) or "a reaches b" (``"not_worse"``).

    ``d_i = b_i - a_i`` per seed (positive: a better); mean ``m`` and standard error ``se`` (sample
    standard deviation / sqrt(n)); ``tol = tolerance * mean(b)`` is the smallest difference that
    counts. With fewer than 2 seeds there is no spread: inconclusive.

    * ``less``: **reproduced** when every d_i > 0 and m > 2 se and m > tol; **not reproduced** when
      every d_i < 0 and -m > 2 se (b is better), or when |m| + 2 se < tol (no difference);
      otherwise inconclusive.
    * ``not_worse``: **reproduced** when m - 2 se > -tol (a is at worst tol behind; or ahead);
      **not reproduced** when every d_i < 0 and -m > 2 se and -m > tol (a stays behind); otherwise
      inconclusive.

    ``why`` is written from the rule that fired and the numbers it fired on (``rule`` names it).
    """
    if len(a) != len(b) or not a:
        raise DistilError("judge needs the same number (>= 1) of paired values on both sides")
    d = [y - x for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    se = statistics.stdev(d) / math.sqrt(n) if n > 1 else math.nan
    a_mean, b_mean = sum(a) / n, sum(b) / n
    tol = tolerance * abs(b_mean)
    out = {"diff": mean, "se": se, "n": n, "tol": tol, "a_mean": a_mean, "b_mean": b_mean}

    def said(verdict: str, rule: str, why: str) -> dict:
        return {**out, "verdict": verdict, "rule": rule, "why": why}

    lower, higher = (a_label, b_label) if mean > 0 else (b_label, a_label)
    apart = f"{min(a_mean, b_mean):.4g} against {max(a_mean, b_mean):.4g}, {higher} " \
            f"{abs(mean) / max(abs(min(a_mean, b_mean)), 1e-12):.0%} higher"
    spread = f"2 SE = {2 * se:.3g}"
    if n < 2:
        return said("inconclusive", "one_seed", "one seed: no run-to-run spread")
    if kind == "less":
        if all(x > 0 for x in d) and mean > 2 * se and mean > tol:
            return said("reproduced", "better", f"{a_label} lower on every seed ({apart}), beyond {spread} "
                        f"and the {tolerance:.0%} threshold")
        if all(x < 0 for x in d) and -mean > 2 * se:
            return said("not reproduced", "opposite", f"the opposite: {b_label} lower on every seed ({apart}), "
                        f"beyond {spread}")
        if abs(mean) + 2 * se < tol:
            return said("not reproduced", "no_difference", f"no difference: |diff| + 2 SE = {abs(mean) + 2 * se:.3g}, "
                        f"under {tolerance:.0%} of {b_label} ({tol:.3g})")
        return said("inconclusive", "within_spread", f"diff {mean:+.3g} against {spread}"
                    + ("" if len({x > 0 for x in d}) == 1 else "; the seeds disagree in sign"))
    if kind == "not_worse":
        if mean - 2 * se > 0:
            where = "on every seed" if all(x > 0 for x in d) else "on average"
            return said("reproduced", "ahead", f"{a_label} ahead {where} ({apart}), beyond {spread}")
        if mean - 2 * se > -tol:
            return said("reproduced", "within_tolerance", f"{a_label} at worst {-(mean - 2 * se):.3g} behind "
                        f"(diff - 2 SE), under {tolerance:.0%} of {b_label} ({tol:.3g})")
        if all(x < 0 for x in d) and -mean > 2 * se and -mean > tol:
            return said("not reproduced", "behind", f"{a_label} behind on every seed ({apart}), beyond {spread} "
                        f"and the {tolerance:.0%} threshold")
        return said("inconclusive", "within_spread", f"diff {mean:+.3g} against {spread}"
                    + ("" if len({x > 0 for x in d}) == 1 else "; the seeds disagree in sign"))
    raise DistilError(f"unknown check kind {kind!r}")
