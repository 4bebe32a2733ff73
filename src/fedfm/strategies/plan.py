"""What a hospital does for a strategy, and the LoRA tensor bookkeeping behind it (pure numpy).

Most strategies only change the server's aggregation. The LoRA-aware ones also
change what a hospital trains and sends: FFA-LoRA freezes A, FedSA-LoRA keeps
B at home, HetLoRA and FLoRA give hospitals different ranks, FLoRA folds the
global update into the base model, FedProx adds a proximal term. A
:class:`ClientPlan` says all of that as plain data; the ClientApp follows it
and the server uses the same functions to build the model it evaluates.

Tensor names are peft's adapter state-dict names, e.g.
``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

LORA_A = ".lora_A.weight"
LORA_B = ".lora_B.weight"
#: FLoRA's stacked global factors of a module (rank grows by the hospitals' ranks every round).
STACKED_A = ".stacked_A"
STACKED_B = ".stacked_B"


def is_lora_a(name: str) -> bool:
    return name.endswith(LORA_A)


def is_lora_b(name: str) -> bool:
    return name.endswith(LORA_B)


def is_lora(name: str) -> bool:
    return is_lora_a(name) or is_lora_b(name)


def module_of(name: str) -> str:
    """The adapted module's path of a LoRA or stacked tensor name."""
    for suffix in (LORA_A, LORA_B, STACKED_A, STACKED_B):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    raise ValueError(f"`{name}` is not a LoRA tensor name")


def lora_modules(names: Iterable[str]) -> list[str]:
    """Sorted paths of the modules that have both a LoRA A and a LoRA B in ``names``."""
    names = set(names)
    return sorted(module_of(n) for n in names if is_lora_a(n) and module_of(n) + LORA_B in names)


def truncate_rank(arrays: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """Keep the first ``rank`` components: rows of each A (r x in), columns of each B (out x r)."""
    out: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if is_lora_a(name):
            out[name] = value[:rank]
        elif is_lora_b(name):
            out[name] = value[:, :rank]
        else:
            out[name] = value
    return out


def pad_rank(arrays: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """Zero-pad every A to ``rank`` rows and every B to ``rank`` columns (inverse of :func:`truncate_rank`)."""
    out: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if is_lora_a(name) and value.shape[0] < rank:
            out[name] = np.concatenate([value, np.zeros((rank - value.shape[0], value.shape[1]), value.dtype)], axis=0)
        elif is_lora_b(name) and value.shape[1] < rank:
            out[name] = np.concatenate([value, np.zeros((value.shape[0], rank - value.shape[1]), value.dtype)], axis=1)
        else:
            out[name] = value
    return out


def mask_rank(arrays: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """Zero the components past ``rank`` while keeping the full shapes."""
    out: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if is_lora(name):
            value = np.array(value, copy=True)
            if is_lora_a(name):
                value[rank:] = 0
            else:
                value[:, rank:] = 0
        out[name] = value
    return out


@dataclass(frozen=True)
class ClientPlan:
    """How a hospital trains and what it sends, for one strategy.

    Attributes
    ----------
    fixed : tuple of str
        Name fragments of tensors nobody trains or sends: they stay at the
        shared initialisation every process builds from the same seed
        (FFA-LoRA: ``lora_A``).
    private : tuple of str
        Name fragments of tensors a hospital trains but keeps, across rounds,
        in its own persistent state (FedSA-LoRA: ``lora_B``).
    rank : int or None
        This hospital's LoRA rank when it is smaller than the model's; it
        trains and sends only the first ``rank`` components.
    fold : bool
        The global adapter arrives as stacked factors to add to the base
        weights; the hospital then trains a fresh adapter (FLoRA).
    proximal_mu : float
        Weight of the FedProx term ``mu/2 ||w - w_global||^2``; 0 for none.
    learning_rate_scale : float
        The hospital trains at ``train.learning-rate`` times this (FFA-LoRA:
        ``strategy.ffa-learning-rate-scale``).
    """

    fixed: tuple[str, ...] = ()
    private: tuple[str, ...] = ()
    rank: int | None = None
    fold: bool = False
    proximal_mu: float = 0.0
    learning_rate_scale: float = 1.0

    def head_only(self) -> ClientPlan:
        """This plan for training a round's head alone (``federation.head-first-rounds``): every LoRA factor is
        held for the training call. Only :func:`fedfm.train.train_local` takes it; what travels still follows
        this plan, so the unchanged factors are sent as ever."""
        return dataclasses.replace(self, fixed=(*self.fixed, "lora_"))

    def is_fixed(self, name: str) -> bool:
        return any(fragment in name for fragment in self.fixed)

    def is_private(self, name: str) -> bool:
        return any(fragment in name for fragment in self.private)

    def is_shared(self, name: str) -> bool:
        """Whether a tensor of the model's adapter travels to and from the server."""
        return not (self.is_fixed(name) or self.is_private(name))

    def shared(self, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The tensors of ``state`` that leave the hospital, cut to its rank."""
        out = {n: v for n, v in state.items() if self.is_shared(n)}
        return truncate_rank(out, self.rank) if self.rank is not None else out

    def kept(self, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The tensors of ``state`` the hospital keeps for its next round."""
        return {n: v for n, v in state.items() if self.is_private(n)}

    def materialize(
        self,
        initial: Mapping[str, np.ndarray],
        received: Mapping[str, np.ndarray],
        kept: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]:
        """The adapter to load before training or evaluation, and the factors to fold into the base.

        Parameters
        ----------
        initial : mapping of str to ndarray
            The model's initial adapter (the same in every process).
        received : mapping of str to ndarray
            The global tensors the server sent.
        kept : mapping of str to ndarray, optional
            This hospital's private tensors from its previous round.

        Returns
        -------
        state : dict of str to ndarray
            A full adapter state: initial values, overwritten by what was
            received, then by what was kept, with components past the rank zeroed.
        fold : dict of str to (A, B)
            Per module path, stacked factors whose product the base must add
            (empty unless the plan folds).
        """
        state = {n: np.array(v, copy=True) for n, v in initial.items()}
        fold: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, value in received.items():
            if name.endswith(STACKED_A):
                module = module_of(name)
                fold[module] = (np.asarray(value), np.asarray(received[module + STACKED_B]))
            elif name.endswith(STACKED_B) or not self.is_shared(name):
                # Fixed tensors stay at the shared initialisation, private ones come from `kept`.
                continue
            elif name in state:
                if self.rank is not None and is_lora(name) and value.shape != state[name].shape:
                    value = pad_rank({name: value}, state[name].shape[0] if is_lora_a(name) else state[name].shape[1])[name]
                state[name] = np.array(value, copy=True)
        for name, value in (kept or {}).items():
            if name in state:
                state[name] = np.array(value, copy=True)
        if self.rank is not None:
            state = mask_rank(state, self.rank)
        return state, fold


def encode_plans(plans: Sequence[ClientPlan]) -> str:
    """Every hospital's plan as compact JSON for the server's instructions.

    Hospitals read their plan from the message instead of importing the
    strategy, so a strategy registered only in the server's process (a user's
    script) or absent from a SuperNode's environment still runs. Equal plans
    are written once.
    """
    distinct: list[ClientPlan] = []
    of: list[int] = []
    for plan in plans:
        if plan not in distinct:
            distinct.append(plan)
        of.append(distinct.index(plan))
    return json.dumps({"plans": [asdict(p) for p in distinct], "of": of}, separators=(",", ":"))


def decode_plan(text: str, hospital: int) -> ClientPlan:
    """Hospital ``hospital``'s plan from :func:`encode_plans` output."""
    data = json.loads(text)
    if not 0 <= hospital < len(data["of"]):
        raise ValueError(f"the server sent plans for {len(data['of'])} hospitals; this is hospital {hospital}")
    fields = data["plans"][data["of"][hospital]]
    return ClientPlan(
        fixed=tuple(fields["fixed"]),
        private=tuple(fields["private"]),
        rank=fields["rank"],
        fold=bool(fields["fold"]),
        proximal_mu=float(fields["proximal_mu"]),
        learning_rate_scale=float(fields.get("learning_rate_scale", 1.0)),
    )
