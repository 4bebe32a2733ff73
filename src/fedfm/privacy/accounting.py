"""A hospital's privacy ledger: its DP-SGD steps over the whole run, and the ε they add up to.

A naive Flower + Opacus client makes a fresh ``PrivacyEngine`` every round, so
the ε it reports never grows. fedfm keeps each hospital's accountant *history*
(Opacus's list of ``(noise multiplier, sample rate, steps)``) in a
:class:`HospitalLedger` that lives in the hospital's persistent state and in a
file beside its other state, and asks an Opacus accountant for ε over the
whole history every round. Nothing here computes ε by a formula of its own.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fedfm import keys
from fedfm.errors import ConfigError
from fedfm.privacy.dpsgd import DpSgd

ACCOUNTANTS = ("rdp", "prv")

#: A step entry of an accountant's history: noise multiplier, sample rate, steps.
HistoryEntry = tuple[float, float, int]


def _accountant(kind: str) -> Any:
    from opacus.accountants import create_accountant

    if kind not in ACCOUNTANTS:
        raise ConfigError(f"`privacy.accountant` must be one of {list(ACCOUNTANTS)}, got {kind!r}")
    return create_accountant(mechanism=kind)


def epsilon_of(history: list[HistoryEntry], delta: float, kind: str = "rdp") -> float:
    """ε that Opacus's ``kind`` accountant reports for a step history at ``delta`` (0 with no steps)."""
    if not history or all(steps == 0 for _, _, steps in history):
        return 0.0
    accountant = _accountant(kind)
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    with warnings.catch_warnings():
        # RDP: "optimal order is the largest alpha" only means the bound could be a little tighter.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(accountant.get_epsilon(delta=delta))


def compose(history: list[HistoryEntry], noise_multiplier: float, sample_rate: float, steps: int) -> list[HistoryEntry]:
    """``history`` followed by ``steps`` more steps, merged as Opacus's accountants merge them."""
    out = list(history)
    if steps <= 0:
        return out
    if out and out[-1][0] == noise_multiplier and out[-1][1] == sample_rate:
        sigma, q, n = out.pop()
        out.append((sigma, q, n + steps))
    else:
        out.append((noise_multiplier, sample_rate, steps))
    return out


@functools.lru_cache(maxsize=256)
def calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int, kind: str = "rdp") -> float:
    """The noise multiplier that spends ``target_epsilon`` over ``steps`` steps (Opacus's search).

    Raises
    ------
    ConfigError
        The budget is too small for any noise Opacus will consider.
    """
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            sigma = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=kind,
                epsilon_tolerance=0.01,
            )
        return float(sigma)
    except ValueError as err:
        raise ConfigError(
            f"`privacy.target-epsilon` {target_epsilon} cannot be met over {steps} DP-SGD steps at sample "
            f"rate {sample_rate:.4g} and delta {delta:.3g}: {err}"
        ) from err


def default_delta(num_rows: int) -> float:
    """δ for a hospital with ``num_rows`` training rows: 1e-5, or 1/N^1.1 when that is smaller.

    The usual rule is δ well below 1/N (a mechanism that publishes one row in
    full has δ = 1/N); 1/N^1.1 takes over only past ~35,000 rows.
    """
    return min(1e-5, 1.0 / max(num_rows, 1) ** 1.1)


@dataclass(frozen=True)
class HospitalLedger:
    """One hospital's DP-SGD budget and everything it has spent, across rounds and restarts.

    Attributes
    ----------
    hospital : str
        The hospital's name.
    target_epsilon : float
        Its budget; it refuses a round that would take ε past it.
    delta : float
        δ of every ε reported.
    noise_multiplier : float
        σ of every step (calibrated once, or set in the config).
    sample_rate : float
        Poisson sampling probability of a row per step (batch size / rows).
    steps_per_round : int
        DP-SGD steps one round of local training takes.
    accountant : str
        ``rdp`` or ``prv``.
    history : list of (σ, q, steps)
        Opacus accountant history of the steps taken so far.
    rounds : list of int
        Server rounds this hospital trained in.
    refused : list of int
        Server rounds it refused because the budget would be exceeded.
    """

    hospital: str
    target_epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    accountant: str = "rdp"
    history: list[HistoryEntry] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self) -> float:
        """ε spent so far, from the accountant."""
        return epsilon_of(self.history, self.delta, self.accountant)

    def epsilon_after(self, steps: int) -> float:
        """ε after ``steps`` more steps at this ledger's noise and sample rate."""
        return epsilon_of(compose(self.history, self.noise_multiplier, self.sample_rate, steps), self.delta, self.accountant)

    def allows(self, steps: int) -> bool:
        """Whether ``steps`` more steps stay within the budget (up to the calibration's 1e-9 slack)."""
        return self.epsilon_after(steps) <= self.target_epsilon * (1 + 1e-9)

    def after_training(self, server_round: int, steps: int) -> HospitalLedger:
        """The ledger once round ``server_round`` took ``steps`` steps."""
        return replace(
            self,
            history=compose(self.history, self.noise_multiplier, self.sample_rate, steps),
            rounds=[*self.rounds, server_round],
        )

    def after_refusal(self, server_round: int) -> HospitalLedger:
        return replace(self, refused=[*self.refused, server_round])

    def round_plan(self, max_grad_norm: float) -> DpSgd:
        """What this ledger's next round of DP-SGD does, with per-example gradients clipped to ``max_grad_norm``."""
        return DpSgd(
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=max_grad_norm,
            sample_rate=self.sample_rate,
            steps=self.steps_per_round,
        )

    def metrics(self, *, refused: bool = False) -> dict[str, float | int]:
        """What a hospital reports of its ledger each round (scalars only)."""
        return {
            keys.DP_EPSILON: self.epsilon(),
            keys.DP_DELTA: self.delta,
            keys.DP_TARGET_EPSILON: self.target_epsilon,
            keys.DP_NOISE_MULTIPLIER: self.noise_multiplier,
            keys.DP_SAMPLE_RATE: self.sample_rate,
            keys.DP_STEPS: self.steps,
            keys.DP_REFUSED: int(refused),
        }

    def to_json(self) -> str:
        data = asdict(self)
        data["history"] = [list(entry) for entry in self.history]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HospitalLedger:
        data = json.loads(text)
        data["history"] = [(float(s), float(q), int(n)) for s, q, n in data["history"]]
        return cls(**data)

    def save(self, path: Path) -> None:
        """Write atomically: a crash mid-write leaves the previous ledger, never half of one."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(self.to_json() + "\n")
        partial.replace(path)

    @classmethod
    def load(cls, path: Path) -> HospitalLedger | None:
        if not path.is_file():
            return None
        return cls.from_json(path.read_text())


def open_ledger(
    *,
    hospital: str,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps_per_round: int,
    planned_rounds: int,
    noise_multiplier: float = 0.0,
    accountant: str = "rdp",
) -> HospitalLedger:
    """A new ledger; σ is calibrated so ``planned_rounds`` rounds spend exactly the budget, unless given."""
    if noise_multiplier <= 0:
        noise_multiplier = calibrate(target_epsilon, delta, sample_rate, steps_per_round * planned_rounds, accountant)
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ConfigError(f"DP-SGD noise multiplier must be a positive number, got {noise_multiplier}")
    return HospitalLedger(
        hospital=hospital,
        target_epsilon=target_epsilon,
        delta=delta,
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps_per_round=steps_per_round,
        accountant=accountant,
    )


def sampled_hospitals(num_hospitals: int, fraction: float, minimum: int) -> int:
    """How many hospitals Flower's FedAvg samples for training each round."""
    return max(int(num_hospitals * fraction), minimum)


@dataclass(frozen=True)
class ClientLevelLedger:
    """The server's ledger of client-level (hospital-level) DP over the rounds.

    Each round is one Gaussian release: the sum of the hospitals' clipped
    updates (norm ≤ C) divided by the number sampled, ``m`` (fixed before any
    reply: :class:`fedfm.strategies.client_dp.FixedDenominator`), plus noise
    of standard deviation σ·C/m. Neighbouring federations differ by one
    hospital added or removed (its update present or zero), so the
    sensitivity is C/m and the round's noise multiplier is σ; when one
    hospital's data is *replaced* instead, the sensitivity is 2C/m and the
    multiplier σ/2 (:meth:`epsilon_replace_one`). No amplification by
    sampling is claimed (sample rate 1 in every history entry): Flower draws
    a fixed-size subset, which Opacus's Poisson analysis does not cover, and
    accounting every round in full is an upper bound whichever hospitals
    were drawn.
    """

    noise_multiplier: float
    delta: float
    accountant: str = "rdp"
    history: list[HistoryEntry] = field(default_factory=list)
    #: Sampling rate of every release in the history (always 1: no amplification claimed).
    sample_rate: float = 1.0

    def after_round(self) -> ClientLevelLedger:
        """The ledger once one more round has released its noised mean."""
        return replace(self, history=compose(self.history, self.noise_multiplier, 1.0, 1))

    @property
    def releases(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self) -> float:
        """ε for one hospital added or removed."""
        return epsilon_of(self.history, self.delta, self.accountant)

    def epsilon_replace_one(self) -> float:
        """ε for one hospital's data replaced (each release at half the noise multiplier)."""
        return epsilon_of([(s / 2, q, n) for s, q, n in self.history], self.delta, self.accountant)
