"""What the server asks of a hospital, parsed once from the instruction's ConfigRecord.

The server (``server.py``, ``strategies/guard.py``; ``secagg.py`` in Flower's
legacy format) puts the resolved run configuration, every hospital's plan, the
round and the round's flags into each instruction's ``config`` record. The
ClientApp turns that record into one :class:`Instruction` at its boundary;
the train and evaluate handlers read typed fields, never key strings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord

from fedfm import keys, strategies
from fedfm.config import RunConfig, from_json, round_learning_rate
from fedfm.data.local import DATA_PATH, HOSPITAL
from fedfm.errors import ConfigError, FedfmError
from fedfm.strategies import ClientPlan
from fedfm.strategies.plan import decode_plan


@dataclass(frozen=True)
class Instruction:
    """One instruction to this hospital, as the ClientApp reads it.

    Attributes
    ----------
    config : RunConfig
        The run's resolved configuration (``fedfm-config``).
    hospital : int
        This hospital's index in the run (from its node config).
    plan : ClientPlan
        What this hospital trains, keeps and sends (``fedfm-client-plans``, else
        computed from the configured strategy).
    server_round : int
        The round the server is in (``server-round``; 0 when absent).
    learning_rate : float
        The round's local learning rate: the server's (``fedfm-learning-rate``,
        ``federation.lr-decay``), else computed from the configuration.
    attempt : int
        Which attempt at its round a training instruction is (``fedfm-attempt``; 0 first).
    audit : bool
        Run the membership-inference audit instead of scoring (``fedfm-audit``).
    personalize_epochs : int
        Fine-tune locally for this many epochs before scoring (``fedfm-personalize-epochs``; 0 for none).
    """

    config: RunConfig
    hospital: int
    plan: ClientPlan
    server_round: int = 0
    learning_rate: float = 0.0
    attempt: int = 0
    audit: bool = False
    personalize_epochs: int = 0


def parse_instruction(record: ConfigRecord, node_config: Mapping[str, Any]) -> Instruction:
    """The :class:`Instruction` in an instruction's ``config`` record, for the hospital ``node_config`` names.

    Raises
    ------
    ConfigError
        The node config does not say which hospital this is (see :func:`hospital_index`).
    FedfmError
        An entry the server sets is not a scalar.
    """
    config = from_json(str(record[keys.RUN_CONFIG]))
    index = hospital_index(config, node_config)
    if keys.CLIENT_PLANS in record:
        plan = decode_plan(str(record[keys.CLIENT_PLANS]), index)
    else:
        plan = strategies.client_plan(config, index)
    server_round = int(_scalar(record, keys.SERVER_ROUND, 0))
    # The round's learning rate is the server's (federation.lr-decay); computed here only when it sent none.
    if keys.LEARNING_RATE in record:
        learning_rate = float(_scalar(record, keys.LEARNING_RATE, 0.0))
    else:
        learning_rate = round_learning_rate(config, server_round)
    return Instruction(
        config=config,
        hospital=index,
        plan=plan,
        server_round=server_round,
        learning_rate=learning_rate,
        attempt=int(_scalar(record, keys.ATTEMPT, 0)),
        audit=bool(record.get(keys.AUDIT)),
        personalize_epochs=int(_scalar(record, keys.PERSONALIZE_EPOCHS, 0)),
    )


def _scalar(record: ConfigRecord, key: str, default: float) -> int | float | str | bool:
    value = record.get(key, default)
    if not isinstance(value, (int, float, str, bool)):
        raise FedfmError(f"instruction config `{key}` must be a number, got {value!r}")
    return value


def hospital_index(config: RunConfig, node_config: Mapping[str, Any]) -> int:
    """This hospital's index in the run.

    Flower's ``partition-id`` in simulation; on a SuperNode, the node config's
    ``partition-id``, or the position of its ``hospital`` name in the run's ``data.hospitals``.
    """
    hospitals = list(config.data.hospitals)
    value, name = node_config.get(keys.PARTITION_ID), node_config.get(HOSPITAL)
    if value is None:
        if hospitals and name is not None:
            if str(name) not in hospitals:
                raise ConfigError(f"node config `{HOSPITAL}` {name!r} is not one of the run's `data.hospitals` "
                                  f"{hospitals}; start the SuperNode with {HOSPITAL}=<one of them>")
            return hospitals.index(str(name))
        raise ConfigError(
            f"this SuperNode has no `{keys.PARTITION_ID}` in its node config; start it with --node-config "
            f"\"{keys.PARTITION_ID}=<hospital index> {DATA_PATH}=<its data file>\", or, when the run lists "
            f"`data.hospitals`, \"{HOSPITAL}=<its name there> {DATA_PATH}=<its data file>\""
        )
    if isinstance(value, bool) or not str(value).isdigit():
        raise ConfigError(
            f"node config `{keys.PARTITION_ID}` must be the hospital's index, an integer >= 0, got {value!r}"
        )
    index = int(value)
    if hospitals and index >= len(hospitals):
        raise ConfigError(f"node config `{keys.PARTITION_ID}` {index} is out of range: the run's `data.hospitals` "
                          f"lists {len(hospitals)} hospitals {hospitals} (indices 0..{len(hospitals) - 1})")
    if hospitals and name is not None and str(name) != hospitals[index]:
        raise ConfigError(
            f"node config `{keys.PARTITION_ID}` {index} is {hospitals[index]!r} in the run's `data.hospitals` "
            f"{hospitals}, but `{HOSPITAL}` says {name!r}; give only `{HOSPITAL}`, or make the two agree"
        )
    return index
