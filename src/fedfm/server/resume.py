"""Resuming a run: the checkpoint it continues from, checked against the configuration it ran under."""

from __future__ import annotations

from pathlib import Path

from fedfm.config import RunConfig, load_config, to_flat
from fedfm.errors import CheckpointError
from fedfm.rundir import Checkpoint, read_checkpoint

#: Settings a resumed run may change: where it writes, how many rounds it runs in all, how it waits and
#: retries, how many workers simulate it, and the simulated failure rate. Nothing that changes what is learnt.
_RESUMABLE_CHANGES = (
    "output.", "federation.num-rounds", "federation.round-timeout", "federation.round-retries",
    "federation.num-workers", "federation.threads-per-worker", "federation.backend", "attack.failure-rate",
    # Which tracked round is exported, when to stop, and the fine-tune after the run: not what rounds learn.
    "federation.select-best", "federation.patience", "federation.personalize-epochs",
)


def resume_point(config: RunConfig, run_dir: Path) -> Checkpoint:
    """The checkpoint a run continues from, after checking it fits ``config``.

    Raises
    ------
    CheckpointError
        No run or checkpoint in ``run_dir``, a corrupt checkpoint (named), a
        configuration that differs from the run's in more than
        :data:`_RESUMABLE_CHANGES`, a run already past ``num-rounds``,
        or secure aggregation (its rounds are Flower's legacy workflow).
    """
    saved_file = run_dir / "config.toml"
    if not saved_file.is_file():
        raise CheckpointError(f"cannot resume {run_dir}: it holds no config.toml (is it a fedfm run directory?)")
    if config.privacy.secure_aggregation:
        raise CheckpointError("resuming a run with privacy.secure-aggregation is not supported; start it afresh")
    checkpoint = read_checkpoint(run_dir)
    # The configuration the completed rounds ran under travels with the checkpoint; config.toml is only
    # the fallback for checkpoints written before that (an edited config.toml must not pass for the run's).
    saved = checkpoint.config if checkpoint.config is not None else to_flat(load_config(saved_file))
    wanted = to_flat(config)
    changed = sorted(
        k for k in set(saved) | set(wanted)
        if saved.get(k) != wanted.get(k) and not k.startswith(_RESUMABLE_CHANGES)
    )
    if changed:
        detail = "; ".join(f"{k} = {saved.get(k)!r} in the run, {wanted.get(k)!r} now" for k in changed)
        raise CheckpointError(
            f"cannot resume {run_dir} with a different configuration ({len(changed)} setting(s) differ: {detail}); "
            f"only {', '.join(k.rstrip('.') + ('.*' if k.endswith('.') else '') for k in _RESUMABLE_CHANGES)} may change"
        )
    if checkpoint.server_round > config.federation.num_rounds:
        raise CheckpointError(
            f"{run_dir} already completed round {checkpoint.server_round}, past federation.num-rounds "
            f"= {config.federation.num_rounds}"
        )
    return checkpoint
