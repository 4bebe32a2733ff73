"""fedfm's messages in Flower's legacy ``FitIns``/``FitRes`` format, for the SecAgg+ workflow.

Flower's SecAgg+ (``SecAggPlusWorkflow`` on the server, ``secaggplus_mod`` on
each hospital) is built on the legacy strategy API: instructions carry
``fitins.parameters`` (an unnamed, ordered list of arrays) and
``fitins.config``, replies ``fitres.*``. The ClientApp translates such
messages into fedfm's own content (named arrays: the server lists them in
the order of its plan's shared tensors) and its replies back, so one
ClientApp serves both. ``secaggplus_mod`` then masks the reply's arrays; they
never leave the hospital in the clear.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedfm import keys
from fedfm.config import RunConfig
from fedfm.errors import FedfmError
from fedfm.instruction import Instruction, parse_instruction
from fedfm.wire import record_to_numpy

#: The record Flower's SecAgg+ workflow puts its protocol messages in.
SECAGG_RECORD = "secaggplus_configs"


def is_legacy(content: RecordDict, ins: str) -> bool:
    """Whether a message's content is a legacy ``fitins``/``evaluateins`` instruction."""
    return f"{ins}.config" in content.config_records


def from_legacy(
    content: RecordDict, ins: str, node_config: Mapping[str, Any], names_of: Callable[[RunConfig], list[str]]
) -> tuple[Instruction, dict[str, np.ndarray]]:
    """The instruction and the named global arrays of a legacy ``fitins``/``evaluateins`` message.

    The same :class:`Instruction` as fedfm's own message of that round would give;
    ``names_of`` names the arrays, which the legacy format lists by position.
    """
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    instruction = parse_instruction(content.config_records[f"{ins}.config"], node_config)
    arrays = parameters_to_ndarrays(compat.arrayrecord_to_parameters(content.array_records[f"{ins}.parameters"], True))
    names = names_of(instruction.config)
    if len(names) != len(arrays):
        raise FedfmError(f"legacy instruction holds {len(arrays)} arrays; this hospital exchanges {len(names)}")
    return instruction, dict(zip(names, arrays, strict=True))


def _metrics(content: RecordDict) -> dict[str, float | int]:
    return {k: v for k, v in content[keys.METRICS].items() if isinstance(v, (int, float))}  # type: ignore[union-attr]


def to_fitres(content: RecordDict) -> RecordDict:
    """A legacy ``FitRes`` content from fedfm's training reply."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    metrics = _metrics(content)
    if keys.ARRAYS not in content:
        # A refusal (e.g. a spent DP budget): under SecAgg+ it must be an error reply, a dropout.
        raise FedfmError("this hospital sends no update this round (its privacy budget is spent)")
    arrays = list(record_to_numpy(content[keys.ARRAYS]).values())  # type: ignore[arg-type]
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), int(metrics[keys.NUM_EXAMPLES]), metrics)  # type: ignore[arg-type]
    return compat.fitres_to_recorddict(fitres, keep_input=True)


def to_evaluateres(content: RecordDict) -> RecordDict:
    """A legacy ``EvaluateRes`` content from fedfm's evaluation reply."""
    from flwr.common import Code, EvaluateRes, Status
    from flwr.compat.common import recorddict_compat as compat

    metrics = _metrics(content)
    result = EvaluateRes(Status(Code.OK, ""), float(metrics.get(keys.LOSS, 0.0)), int(metrics[keys.NUM_EXAMPLES]), metrics)  # type: ignore[arg-type]
    return compat.evaluateres_to_recorddict(result)


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: Flower's ``secaggplus_mod`` for SecAgg+ protocol messages, a pass-through otherwise."""
    if SECAGG_RECORD not in msg.content.config_records:
        return call_next(msg, context)
    from flwr.client.mod import secaggplus_mod

    return secaggplus_mod(msg, context, call_next)
