"""Client-level DP: Flower's DP wrappers around a strategy that aggregates by FedAvg's mean.

``privacy.client-dp`` picks one of Flower's four wrappers (server- or
client-side clipping, fixed or adaptive norm). Flower adds the noise to the
*aggregate* at the scale of one hospital's share of a uniform mean, so the
guarantee holds only when:

- the aggregate is FedAvg's mean (a server optimizer such as FedAdam or
  FedAvgM would step on the un-noised mean and keep it in its state);
- every hospital weighs the same (``GuardedStrategy(uniform_weights=True)``
  sets each reply's example count to 1);
- every hospital sends its whole adapter (the wrappers compute each update
  against the whole global record).

fedfm refuses other combinations before anything runs, and accounts ε over
the rounds with Opacus (:class:`fedfm.privacy.accounting.ClientLevelLedger`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
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

#: The key Flower's client-side wrappers put the clipping norm under.
CLIPPING_NORM_KEY = "clipping_norm"
#: fedfm's own marker of the client-side adaptive wrapper (its mod also reports a norm bit).
ADAPTIVE_KEY = "fedfm-adaptive-clipping"


class _ClientSideAdaptiveClipping(DifferentialPrivacyClientSideAdaptiveClipping):
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
    "server-fixed": DifferentialPrivacyServerSideFixedClipping,
    "server-adaptive": DifferentialPrivacyServerSideAdaptiveClipping,
    "client-fixed": DifferentialPrivacyClientSideFixedClipping,
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
    if spec.client_dp.endswith("fixed"):
        return cls(inner, spec.client_noise_multiplier, spec.client_clipping_norm, sampled)  # type: ignore[no-any-return]
    try:
        return cls(  # type: ignore[no-any-return]
            inner,
            spec.client_noise_multiplier,
            sampled,
            initial_clipping_norm=spec.client_clipping_norm,
            target_clipped_quantile=spec.client_target_quantile,
            clip_norm_lr=spec.client_clip_learning_rate,
            clipped_count_stddev=spec.client_clipped_count_stddev or None,
        )
    except ValueError as err:  # Flower's check of the noise split (fedfm.privacy.check says it earlier)
        raise ConfigError(f"`privacy.client-dp` {spec.client_dp!r}: {err}") from err
