"""The statistics behind tripcast's decisions, in numpy alone.

**Comparing two models online** (experiments, and the guard after a promotion) uses an *asymptotic confidence
sequence*: Waudby-Smith, Arbour, Sinha, Kennedy and Ramdas, "Time-uniform central limit theory and asymptotic
confidence sequences", Annals of Statistics 52(6), 2024 (arXiv:2103.06476), Theorem 2.2 with the normal-mixture
boundary. For i.i.d. per-ride quantities ψ with mean Δ, sample mean Δ̂ₜ and standard deviation σ̂ₜ after t rides,

    Δ̂ₜ ± σ̂ₜ · sqrt( 2(tρ² + 1) / (t²ρ²) · log( sqrt(tρ² + 1) / α ) )

holds Δ at *every* t at once with probability → 1 − α, so it may be looked at after every window without the
inflation a t-test re-run at each look suffers (bench/experiments.py measures both). ρ sets the sample size the
sequence is tightest at (``planned``). ψ is built from squared errors, the metric RMSE is made of:

- shadow (paired): ψᵢ = k·eᵢ(incumbent) − eᵢ(candidate), both models' squared errors on the same ride;
- A/B (independent arms, a share π answered by the candidate): the augmented inverse-propensity score of the
  same difference, with each arm's mean error so far as its predictable baseline, which keeps ψ's mean Δ and
  most of the pairing's variance reduction's worth (Section 3 of the paper).

With k = (1 − margin)², Δ > 0 means the candidate's RMSE beats the incumbent's by the margin; with k = 1, Δ < 0
means the candidate is worse. Looks before ``min_rides`` (in each arm, A/B) decide nothing: the boundary is
asymptotic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def boundary(t: np.ndarray | int, alpha: float, planned: int) -> np.ndarray:
    """Half-width of the confidence sequence per unit of standard deviation, after ``t`` observations."""
    rho2 = (-2 * np.log(alpha) + np.log(-2 * np.log(alpha) + 1)) / planned
    t = np.asarray(t, dtype=np.float64)
    return np.sqrt(2 * (t * rho2 + 1) / (t * t * rho2) * np.log(np.sqrt(t * rho2 + 1) / alpha))


@dataclass(frozen=True)
class Interval:
    estimate: float
    lower: float
    upper: float
    n: int


def sequence(values: np.ndarray, alpha: float, planned: int) -> Interval:
    """The confidence sequence's interval for the mean of ``values`` (all observations so far)."""
    n = len(values)
    if n < 2:
        return Interval(float(values.mean()) if n else 0.0, -np.inf, np.inf, n)
    mean, sd = float(values.mean()), float(values.std(ddof=1))
    half = float(boundary(n, alpha, planned)) * sd
    return Interval(mean, mean - half, mean + half, n)


def paired_scores(incumbent: np.ndarray, candidate: np.ndarray, k: float) -> np.ndarray:
    """ψ for shadow evidence: both models' squared errors on the same rides."""
    return k * incumbent - candidate


def ab_scores(errors: np.ndarray, is_candidate: np.ndarray, share: float, k: float,
              seen: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
    """ψ for A/B evidence, in the order the rides were answered (the last axis): the augmented inverse-propensity
    score of k·E[incumbent's error] − E[candidate's error], each arm's baseline its mean error before the ride.
    ``seen``: (rides, incumbent rides, their error sum, candidate rides, their error sum) before these (a
    simulation feeds rides in parts)."""
    candidate = is_candidate.astype(bool)
    incumbent = ~candidate
    shape = errors.shape[:-1] + (1,)
    prior = [np.zeros(shape)] * 5 if seen is None else [np.reshape(np.asarray(x, dtype=np.float64), shape)
                                                        for x in seen]

    def before(values: np.ndarray, start: np.ndarray) -> np.ndarray:  # the sum over the rides before each ride
        total = np.cumsum(values, axis=-1)
        return start + np.concatenate([np.zeros_like(total[..., :1]), total[..., :-1]], axis=-1)

    overall_sum = before(errors, prior[2] + prior[4])
    overall = overall_sum / np.maximum(before(np.ones_like(errors), prior[0]), 1)
    baselines = []
    for arm, (count0, sum0) in ((incumbent, (prior[1], prior[2])), (candidate, (prior[3], prior[4]))):
        counts = before(arm.astype(np.float64), count0)
        sums = before(np.where(arm, errors, 0.0), sum0)
        baselines.append(np.where(counts > 0, sums / np.maximum(counts, 1), overall))
    base_inc, base_cand = baselines
    return (k * (base_inc + incumbent * (errors - base_inc) / (1 - share))
            - (base_cand + candidate * (errors - base_cand) / share))


@dataclass(frozen=True)
class Look:
    """One look at an experiment's evidence."""

    rides: int  # labelled rides that count
    rides_candidate: int  # of which answered (A/B) by the candidate; in shadow mode, all of them
    incumbent_rmse: float
    candidate_rmse: float
    margin: Interval  # k = (1 - margin)^2: lower > 0 shows the candidate better by the margin
    zero: Interval  # k = 1: upper < 0 shows the candidate worse
    verdict: str  # better (by the margin), worse, or undecided

    @property
    def improvement(self) -> float:
        """The candidate's RMSE below the incumbent's, relative (0.03: 3 % lower)."""
        return 1 - self.candidate_rmse / self.incumbent_rmse if self.incumbent_rmse else 0.0

    def improvement_bounds(self) -> tuple[float, float]:
        """The interval of ``zero`` on the same relative scale as ``improvement`` (for people)."""
        mse = self.incumbent_rmse ** 2
        if not mse or not np.isfinite(self.zero.lower):
            return -np.inf, np.inf
        return (float(1 - np.sqrt(max(0.0, 1 - self.zero.lower / mse))),
                float(1 - np.sqrt(max(0.0, 1 - self.zero.upper / mse))))


def look(incumbent: np.ndarray, candidate: np.ndarray, is_candidate: np.ndarray | None, share: float | None,
         margin: float, alpha: float, planned: int, min_rides: int) -> Look:
    """Shadow evidence (``is_candidate`` None: ``incumbent`` and ``candidate`` are both models' squared errors on
    the same rides), or A/B evidence (``incumbent`` holds every ride's squared error, from whichever model
    answered it, ``is_candidate`` says which, ``share`` is the candidate's share of traffic)."""
    if is_candidate is None:
        scores = [paired_scores(incumbent, candidate, k) for k in ((1 - margin) ** 2, 1.0)]
        rides, on_candidate = len(incumbent), len(incumbent)
        rmse_inc, rmse_cand = np.sqrt(incumbent.mean()) if rides else 0.0, np.sqrt(candidate.mean()) if rides else 0.0
    else:
        scores = [ab_scores(incumbent, is_candidate, share, k) for k in ((1 - margin) ** 2, 1.0)]
        rides, on_candidate = len(incumbent), int(is_candidate.sum())
        arm_inc, arm_cand = incumbent[~is_candidate.astype(bool)], incumbent[is_candidate.astype(bool)]
        rmse_inc = float(np.sqrt(arm_inc.mean())) if len(arm_inc) else 0.0
        rmse_cand = float(np.sqrt(arm_cand.mean())) if len(arm_cand) else 0.0
    with_margin, without = (sequence(s, alpha, planned) for s in scores)
    verdict = "undecided"
    # A/B: ``min_rides`` in each arm (at a 10 % share the challenger's errors weigh ten times as much, and the
    # interval, asymptotic, came too early: 2 % of equal challengers promoted at ~2,000 rides in simulation).
    seen = rides if is_candidate is None else min(on_candidate, rides - on_candidate)
    if seen >= min_rides:
        verdict = "better" if with_margin.lower > 0 else "worse" if without.upper < 0 else "undecided"
    return Look(rides, on_candidate, float(rmse_inc), float(rmse_cand), with_margin, without, verdict)


# --- drift alarms that know their sample sizes -------------------------------------------------------------
# Evidently measures each feature's drift as a distance: Jensen-Shannon (natural log) between the category shares
# for zones, Wasserstein divided by the reference's standard deviation for numbers. Between two samples of one
# and the same distribution that distance is not zero: it shrinks like 1/sqrt(size), so a fixed threshold chosen
# on full weeks is crossed by sampling noise alone on a partial week, a sampled replay, or against a small
# reference. A window is drifted only where its distance also exceeds what samples of its size and the
# reference's, drawn from the reference itself, reach with probability ``false_alarm`` (a parametric bootstrap:
# multinomial draws over the reference's values, so a threshold costs milliseconds).

def js_distance(p_counts: np.ndarray, q_counts: np.ndarray, base: float | None = None) -> np.ndarray:
    """Jensen-Shannon distance between rows of counts over the same categories (as scipy's, row-wise)."""
    p = p_counts / p_counts.sum(axis=-1, keepdims=True)
    q = q_counts / q_counts.sum(axis=-1, keepdims=True)
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(p > 0, p * np.log(p / m), 0.0).sum(axis=-1) + np.where(q > 0, q * np.log(q / m), 0.0).sum(axis=-1)
    value = np.sqrt(np.maximum(kl / 2, 0.0))
    return value / np.sqrt(np.log(base)) if base else value


def normed_wasserstein(p_counts: np.ndarray, q_counts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Wasserstein-1 distance between rows of counts over sorted ``values``, divided by the first distribution's
    standard deviation (as Evidently's normed Wasserstein on the raw values)."""
    p = p_counts / p_counts.sum(axis=-1, keepdims=True)
    q = q_counts / q_counts.sum(axis=-1, keepdims=True)
    gaps = np.diff(values)
    distance = (np.abs(np.cumsum(p - q, axis=-1)[..., :-1]) * gaps).sum(axis=-1)
    mean = (p * values).sum(axis=-1, keepdims=True)
    sd = np.sqrt((p * (values - mean) ** 2).sum(axis=-1))
    return distance / np.maximum(sd, 0.001)


def null_quantile(reference_counts: np.ndarray, n: int, m: int, statistic, false_alarm: float,
                  draws: int = 400, seed: int = 0) -> float:
    """The (1 - false_alarm) quantile of ``statistic(reference sample of m, window sample of n)`` when both come
    from the reference's distribution (no drift at all)."""
    rng = np.random.default_rng(seed)
    p = reference_counts / reference_counts.sum()
    chunk = max(1, 4_000_000 // len(p))  # draws at a time: a few tens of MB, whatever the support
    values = np.concatenate([statistic(rng.multinomial(m, p, size=k).astype(np.float64),
                                       rng.multinomial(n, p, size=k).astype(np.float64))
                             for k in [chunk] * (draws // chunk) + [draws % chunk] if k])
    return float(np.quantile(values, 1 - false_alarm))


def support(values: np.ndarray, resolution: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct values, their counts); numbers rounded to ``resolution`` first (a bootstrap over 60,000
    distinct predictions would need gigabytes; to a hundredth of a minute the distance hardly moves)."""
    if resolution:
        values = np.round(values / resolution) * resolution
    return np.unique(values, return_counts=True)
