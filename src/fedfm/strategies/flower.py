"""Flower's own strategies, registered with their parameters read from ``[strategy]``.

Flower's implementations do the aggregation; fedfm only maps config keys to
their constructor arguments and says which are linear. They see the adapter
tensors each hospital sends (LoRA A and B, and the task head), so averaging
A and B separately is what FedAvg does here; the LoRA-aware strategies
(:mod:`~fedfm.strategies.ffa_lora`, :mod:`~fedfm.strategies.flora`, ...) fix that.

- FedAvg (McMahan et al. 2017, https://arxiv.org/abs/1602.05629)
- FedAvgM (Hsu et al. 2019, https://arxiv.org/abs/1909.06335)
- FedProx (Li et al. 2020, https://arxiv.org/abs/1812.06127): the proximal
  term is added to each hospital's local loss (:class:`~fedfm.strategies.plan.ClientPlan`)
- FedAdam, FedYogi, FedAdagrad (Reddi et al. 2021, https://arxiv.org/abs/2003.00295):
  the server optimizer's moments live in the strategy across rounds
- FedMedian, FedTrimmedAvg (Yin et al. 2018, https://arxiv.org/abs/1803.01498)
- Krum, MultiKrum (Blanchard et al. 2017,
  https://papers.nips.cc/paper/6617-machine-learning-with-adversaries-byzantine-tolerant-gradient-descent)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flwr.serverapp import strategy as fl

from fedfm.strategies.plan import ClientPlan
from fedfm.strategies.registry import register

if TYPE_CHECKING:
    from fedfm.config import RunConfig


def _fedavgm(config: RunConfig, num_hospitals: int) -> dict[str, Any]:
    s = config.strategy
    return {"server_learning_rate": s.server_learning_rate, "server_momentum": s.server_momentum}


def _fedprox(config: RunConfig, num_hospitals: int) -> dict[str, Any]:
    return {"proximal_mu": config.strategy.proximal_mu}


def _fedprox_plan(config: RunConfig, hospital: int) -> ClientPlan:
    return ClientPlan(proximal_mu=config.strategy.proximal_mu)


#: Each server optimizer's learning rate when ``strategy.eta`` is 0 (the default), chosen on the
#: hospitals' validation splits of NICTA-PIBOSO (LoRA r=8, local AdamW lr 3e-3, 12 steps a round;
#: docs/strategies.md). They differ because Flower's three steps scale differently with tau = 1e-2:
#: FedAdam's bias correction multiplies its step by sqrt(1 - beta_2^(t+1)) (0.14 in round 1), FedYogi
#: has none, and FedAdagrad divides by the root of the summed squares.
SERVER_ETA: dict[str, float] = {"fedadam": 5e-2, "fedyogi": 1.5e-2, "fedadagrad": 3e-2}


def server_eta(config: RunConfig, name: str) -> float:
    """The server learning rate ``name`` (``fedadam``, ``fedyogi`` or ``fedadagrad``) runs with.

    Parameters
    ----------
    config : RunConfig
        The run's configuration; a positive ``strategy.eta`` is used as it is.
    name : str
        The server optimizer.

    Returns
    -------
    float
        ``strategy.eta``, or the optimizer's own default (:data:`SERVER_ETA`) when it is 0.
    """
    return config.strategy.eta or SERVER_ETA[name]


def _fedopt(name: str) -> Callable[[RunConfig, int], dict[str, Any]]:
    def options(config: RunConfig, num_hospitals: int) -> dict[str, Any]:
        s = config.strategy
        return {"eta": server_eta(config, name), "eta_l": config.train.learning_rate, "beta_1": s.beta_1,
                "beta_2": s.beta_2, "tau": s.tau}
    return options


def _fedadagrad(config: RunConfig, num_hospitals: int) -> dict[str, Any]:
    # Flower's FedAdagrad fixes beta_1 at 0: no momentum, so strategy.beta-1 does not apply.
    return {"eta": server_eta(config, "fedadagrad"), "eta_l": config.train.learning_rate, "tau": config.strategy.tau}


def _trimmed(config: RunConfig, num_hospitals: int) -> dict[str, Any]:
    return {"beta": config.strategy.trim_fraction}


def _krum(config: RunConfig, num_hospitals: int) -> dict[str, Any]:
    return {"num_malicious_nodes": config.strategy.byzantine}


def _multikrum(config: RunConfig, num_hospitals: int) -> dict[str, Any]:
    s = config.strategy
    select = s.krum_select or max(1, num_hospitals - s.byzantine)
    return {"num_malicious_nodes": s.byzantine, "num_nodes_to_select": select}


# The FedOpt family and FedAvgM aggregate the weighted mean of the updates and then
# take a server optimizer step on that mean: the server needs only the sum, so they are linear.
register("fedavg", fl.FedAvg, linear=True)
register("fedavgm", fl.FedAvgM, linear=True, options=_fedavgm)
register("fedprox", fl.FedProx, linear=True, options=_fedprox, plan=_fedprox_plan)
register("fedadam", fl.FedAdam, linear=True, options=_fedopt("fedadam"))
register("fedyogi", fl.FedYogi, linear=True, options=_fedopt("fedyogi"))
register("fedadagrad", fl.FedAdagrad, linear=True, options=_fedadagrad)
register("fedmedian", fl.FedMedian, linear=False)
register("fedtrimmedavg", fl.FedTrimmedAvg, linear=False, options=_trimmed)
register("krum", fl.Krum, linear=False, options=_krum)
register("multikrum", fl.MultiKrum, linear=False, options=_multikrum)
