"""Aggregation strategies: Flower's, LoRA-aware ones, and yours, behind one registry.

``federation.strategy = "name"`` picks a class registered with :func:`register`
(or ``module:Class``); :class:`GuardedStrategy` wraps whichever is chosen so
that bad replies are left out of the round. Parameters come from the
``[strategy]`` config section.

==================  =======  ==================================================
name                linear   what it does
==================  =======  ==================================================
``fedavg``          yes      weighted mean (Flower)
``fedavgm``         yes      FedAvg with server momentum (Flower)
``fedprox``         yes      FedAvg; proximal term in each local loss (Flower)
``fedadam``         yes      server Adam on the mean update (Flower)
``fedyogi``         yes      server Yogi on the mean update (Flower)
``fedadagrad``      yes      server Adagrad on the mean update (Flower)
``fedmedian``       no       coordinate-wise median (Flower)
``fedtrimmedavg``   no       coordinate-wise trimmed mean (Flower)
``krum``            no       the one update closest to its neighbours (Flower)
``multikrum``       no       mean of the updates Krum scores best (Flower)
``ffa-lora``        yes      A frozen and never sent; B averaged (exact)
``fedsa-lora``      yes      A averaged; each hospital keeps its own B
``hetlora``         no       per-hospital ranks; zero-pad, sparsity-weighted mean
``flora``           no       per-hospital ranks; stacked factors (exact sum of B_k A_k)
==================  =======  ==================================================
"""

from __future__ import annotations

from fedfm.strategies import flower as _flower  # noqa: F401  # registers Flower's strategies
from fedfm.strategies.base import AdapterStrategy, Update, weighted_mean
from fedfm.strategies.checks import check, config_problems
from fedfm.strategies.factory import create, initial_arrays
from fedfm.strategies.fedsa_lora import FedSaLora
from fedfm.strategies.ffa_lora import FfaLora
from fedfm.strategies.flora import FLoRA
from fedfm.strategies.flower import SERVER_ETA, server_eta
from fedfm.strategies.guard import GuardedStrategy, RoundRecord
from fedfm.strategies.hetlora import HetLora
from fedfm.strategies.plan import ClientPlan
from fedfm.strategies.registry import available, client_plan, entry, is_linear, register, require_linear
from fedfm.strategies.validation import update_problems

register("ffa-lora", FfaLora, linear=True, plan=FfaLora.client_plan)
register("fedsa-lora", FedSaLora, linear=True, plan=FedSaLora.client_plan)
# HetLoRA's sparsity weights need each update's norm, and FLoRA stacks each update: neither is a weighted sum.
register("hetlora", HetLora, linear=False, plan=HetLora.client_plan, heterogeneous_ranks=True)
register("flora", FLoRA, linear=False, plan=FLoRA.client_plan, heterogeneous_ranks=True)

__all__ = [
    "SERVER_ETA",
    "AdapterStrategy",
    "ClientPlan",
    "FLoRA",
    "FedSaLora",
    "FfaLora",
    "GuardedStrategy",
    "HetLora",
    "RoundRecord",
    "Update",
    "available",
    "check",
    "client_plan",
    "config_problems",
    "create",
    "entry",
    "initial_arrays",
    "is_linear",
    "register",
    "require_linear",
    "server_eta",
    "update_problems",
    "weighted_mean",
]

