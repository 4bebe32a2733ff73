"""Client-level DP: Flower's DP wrappers around a strategy that aggregates by FedAvg's mean.

``privacy.client-dp`` picks one of Flower's four wrappers (server- or
client-side clipping, fixed or adaptive norm). Flower adds the noise to the
*aggregate* at the scale of one hospital's share of a uniform mean over the
``m`` hospitals sampled, so the guarantee holds only when:

- the aggregate is FedAvg's mean (a server optimizer such as FedAdam or
  FedAvgM would step on the un-noised mean and keep it in its state);
- every hospital weighs the same (``GuardedStrategy(uniform_weights=True)``
  sets each reply's example count to 1);
- every hospital sends its whole adapter (the wrappers compute each update
  against the whole global record);
- the mean's denominator does not depend on who replied: fedfm divides the
  sum of the clipped updates by ``m`` (:class:`FixedDenominator`), so a
  hospital that is absent, fails or is left out contributes a zero update,
  and every round releases (noise only, if nobody replied). Its sensitivity
  is then ``C / m`` when one hospital is added or removed;
- whether a reply enters depends on that reply alone (the guard's
  median-based norm screen is off under client-level DP).

fedfm refuses other combinations before anything runs, and accounts ε over
the rounds with Opacus (:class:`fedfm.privacy.accounting.ClientLevelLedger`).
The noise (and the adaptive wrappers' noisy count) comes from the operating
system's entropy, not from numpy's global generator, which a checkpoint stores.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)

from fedfm import keys
from fedfm.config import RunConfig
from fedfm.errors import ConfigError
from fedfm.wire import numpy_to_record, record_to_numpy

#: The key Flower's client-side wrappers put the clipping norm under.
CLIPPING_NORM_KEY = "clipping_norm"
#: fedfm's own marker of the client-side adaptive wrapper (its mod also reports a norm bit).
ADAPTIVE_KEY = "fedfm-adaptive-clipping"


class FixedDenominator(Strategy):
    """FedAvg's uniform mean, divided by the hospitals sampled rather than by those that replied.

    ``inner`` (FedAvg or FedProx, with every reply weighing 1) averages the
    ``k`` replies it is given; this returns ``start + (k / m) (mean - start)``,
    i.e. the start plus the sum of the updates over ``m``: a missing hospital
    counts as a zero update, and no replies at all leave the start (to which
    the DP wrapper around this still adds its noise).
    """

    def __init__(self, inner: Strategy, sampled: int) -> None:
        self.inner = inner
        self.sampled = sampled
        self._start: dict[str, np.ndarray] = {}

    def __getattr__(self, name: str) -> Any:  # Flower's wrappers read e.g. ``weighted_by_key``
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._start = record_to_numpy(arrays)
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if not replies:
            return numpy_to_record(self._start), None
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is None:
            return None, metrics
        share = len(replies) / self.sampled
        mean = record_to_numpy(arrays)
        return numpy_to_record({
            name: (start + share * (mean[name].astype(np.float64) - start)).astype(mean[name].dtype)
            for name, start in ((n, self._start[n].astype(np.float64)) for n in mean)
        }), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)


def _secret_normal(mean: float, std: float, shape: tuple[int, ...] = ()) -> Any:
    return np.random.default_rng(secrets.randbits(128)).normal(mean, std, shape)


class _SecretNoise:
    """Mixin for Flower's DP wrappers: noise from OS entropy, the clipped count over the hospitals sampled."""

    noise_multiplier: float
    clipping_norm: float
    num_sampled_clients: int
    clipped_count_stddev: float

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        std = self.noise_multiplier * self.clipping_norm / self.num_sampled_clients
        return numpy_to_record({
            name: (value + _secret_normal(0.0, std, value.shape)).astype(value.dtype)
            for name, value in record_to_numpy(aggregated).items()
        })

    def _noisy_fraction(self, count: int, total: int) -> float:
        # Over the hospitals sampled, not those that replied: the denominator must not depend on the replies.
        return float(_secret_normal(count, self.clipped_count_stddev)) / float(self.num_sampled_clients)


class _ServerSideFixedClipping(_SecretNoise, DifferentialPrivacyServerSideFixedClipping):
    pass


class _ServerSideAdaptiveClipping(_SecretNoise, DifferentialPrivacyServerSideAdaptiveClipping):
    pass


class _ClientSideFixedClipping(_SecretNoise, DifferentialPrivacyClientSideFixedClipping):
    pass


class _ClientSideAdaptiveClipping(_SecretNoise, DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's wrapper, also telling hospitals to use the adaptive mod (both send the same norm key)."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        config[ADAPTIVE_KEY] = True
        return super().configure_train(server_round, arrays, config, grid)


def clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: apply Flower's client-side clipping mod when the server's wrapper asks for it."""
    from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

    config = msg.content.config_records.get(keys.CONFIG) if msg.metadata.message_type == "train" else None
    if config is None or CLIPPING_NORM_KEY not in config:
        return call_next(msg, context)
    mod = adaptiveclipping_mod if config.get(ADAPTIVE_KEY) else fixedclipping_mod
    return mod(msg, context, call_next)


WRAPPERS: dict[str, type[Strategy]] = {
    "server-fixed": _ServerSideFixedClipping,
    "server-adaptive": _ServerSideAdaptiveClipping,
    "client-fixed": _ClientSideFixedClipping,
    "client-adaptive": _ClientSideAdaptiveClipping,
}


def problems(config: RunConfig, strategy_cls: type, shares_everything: bool) -> list[str]:
    """Why client-level DP cannot run with this strategy (empty when it can)."""
    mode = config.privacy.client_dp
    if mode == "none":
        return []
    name = config.federation.strategy
    found = []
    if not (isinstance(strategy_cls, type) and issubclass(strategy_cls, FedAvg)
            and strategy_cls.aggregate_train is FedAvg.aggregate_train):
        found.append(
            f"`privacy.client-dp` {mode!r} adds noise to FedAvg's mean of the clipped updates; strategy {name!r} "
            "aggregates differently (a server optimizer or a robust rule would act on the un-noised updates), "
            "so the guarantee would not hold; use 'fedavg' or 'fedprox'"
        )
    if not shares_everything:
        found.append(
            f"`privacy.client-dp` {mode!r} clips each hospital's update against the whole global adapter; "
            f"with strategy {name!r} hospitals send only part of it"
        )
    return found


def wrap(inner: Strategy, config: RunConfig, sampled: int) -> Strategy:
    """``inner`` behind the configured Flower DP wrapper (``inner`` itself when client-dp is none)."""
    spec = config.privacy
    if spec.client_dp == "none":
        return inner
    cls: Any = WRAPPERS[spec.client_dp]
    mean = FixedDenominator(inner, sampled)
    if spec.client_dp.endswith("fixed"):
        return cls(mean, spec.client_noise_multiplier, spec.client_clipping_norm, sampled)  # type: ignore[no-any-return]
    try:
        return cls(  # type: ignore[no-any-return]
            mean,
            spec.client_noise_multiplier,
            sampled,
            initial_clipping_norm=spec.client_clipping_norm,
            target_clipped_quantile=spec.client_target_quantile,
            clip_norm_lr=spec.client_clip_learning_rate,
            clipped_count_stddev=spec.client_clipped_count_stddev or None,
        )
    except ValueError as err:  # Flower's check of the noise split (fedfm.privacy.check says it earlier)
        raise ConfigError(f"`privacy.client-dp` {spec.client_dp!r}: {err}") from err
