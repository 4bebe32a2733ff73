"""What the server and the hospitals both compute from a configuration.

Each side calls the same function, so a round's learning rate, a hospital's
rank or budget and the rounds that are evaluated agree without being sent.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

from fedfm.config.choices import PROBE_TASKS

if TYPE_CHECKING:
    from fedfm.config.schema import FederationSpec, PrivacySpec, RunConfig


def hospital_epsilons(spec: PrivacySpec) -> dict[str, float]:
    """``privacy.hospital-epsilon`` as ``{name or index: epsilon}``."""
    out = {}
    for entry in spec.hospital_epsilon:
        name, _, value = entry.partition("=")
        out[name.strip()] = float(value)
    return out


def evaluation_due(spec: FederationSpec, server_round: int) -> bool:
    """Whether round ``server_round`` is evaluated (round 0 is the initial adapter, always scored)."""
    return server_round in (0, spec.num_rounds) or server_round % spec.evaluate_every == 0


def round_learning_rate(config: RunConfig, server_round: int) -> float:
    """The local learning rate of round ``server_round`` (1-based) under ``federation.lr-decay``.

    The full rate (``privacy.learning-rate`` under DP-SGD when set, else
    ``train.learning-rate``) in round 1, falling to ``lr-min-ratio`` times it
    in round ``num-rounds``; later rounds (a run extended on resume) keep the floor.
    """
    base = config.train.learning_rate
    if config.privacy.mode == "dp-sgd" and config.privacy.learning_rate > 0:
        base = config.privacy.learning_rate
    fe = config.federation
    if fe.lr_decay == "none" or fe.num_rounds <= 1:
        return base
    progress = min(max((server_round - 1) / (fe.num_rounds - 1), 0.0), 1.0)
    shape = 1 - progress if fe.lr_decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return base * (fe.lr_min_ratio + (1 - fe.lr_min_ratio) * shape)


def head_only_round(config: RunConfig, server_round: int) -> bool:
    """Whether hospitals train only the classifier head in round ``server_round`` (``federation.head-first-rounds``)."""
    return 1 <= server_round <= config.federation.head_first_rounds


def recipe_of(config: RunConfig) -> str:
    """What a DP-SGD hospital trains: ``linear-probe`` or ``lora`` (``auto``: the probe for text and image
    classification, LoRA for the other tasks)."""
    recipe = config.privacy.recipe
    if recipe == "auto":
        return "linear-probe" if config.model.task in PROBE_TASKS else "lora"
    return recipe


def hospital_rank(config: RunConfig, hospital: int) -> int:
    """The LoRA rank hospital ``hospital`` trains: ``federation.client-ranks`` cycled, else ``lora.r``."""
    ranks = config.federation.client_ranks
    return ranks[hospital % len(ranks)] if ranks else config.lora.r


def available_cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_parallelism(spec: FederationSpec) -> tuple[int, int]:
    """Simulation workers and torch threads per worker for this machine.

    One worker per two cores (at least one): on small CPUs a worker with two
    threads trains faster than two single-threaded workers that each hold a
    model copy.
    """
    cores = available_cores()
    workers = spec.num_workers or max(1, cores // 2)
    threads = spec.threads_per_worker or max(1, cores // workers)
    return workers, threads
