"""``fedfm privacy-report RUN_DIR``: the privacy ledger of a run as a table (and a plot).

Lays out what the run directory records (read by :func:`fedfm.rundir.read_run`,
as ``fedfm report`` reads it): ε each hospital reported every round
(sample-level DP-SGD), the client-level ε of the server's ledger, the
membership-inference audit, and what left each hospital (tensor names and
bytes). :func:`plot_epsilon` draws the ε plot of both reports.

This module is in layer 2 (``privacy/``) and takes the run directory's records
(:mod:`fedfm.rundir.records`, layer 3) as arguments only: it never imports them at run time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fedfm.errors import ReportError

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from fedfm.rundir.records import RoundEntry, RunSummary

#: The only file type ``--plot`` writes.
PLOT_SUFFIX = ".png"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _tensor_groups(names: Sequence[str]) -> str:
    """``lora_A.weight x12, lora_B.weight x12, classifier.weight x1``: what kinds of tensors, how many."""
    kinds = Counter(".".join(name.split(".")[-2:]) for name in names)
    return ", ".join(f"{kind} x{count}" for kind, count in sorted(kinds.items()))


def ledger_table(rounds: Sequence[RoundEntry], summary: RunSummary | None) -> str:
    """The ledger as plain text: one row per round, one ε column per hospital, then the totals.

    Parameters
    ----------
    rounds : list of RoundEntry
        The run's rounds (:attr:`fedfm.rundir.RunFiles.rounds`).
    summary : RunSummary or None
        The run's summary (None while it runs or after it was killed).
    """
    hospitals = sorted({name for entry in rounds for name in entry.privacy.sample_level_epsilon})
    client_level = any(entry.privacy.client_level is not None for entry in rounds)
    privacy = summary.privacy if summary is not None else None
    lines = []
    if not hospitals and not client_level:
        mode, client_dp = (privacy.mode, privacy.client_dp) if privacy is not None else ("none", "none")
        lines.append(f"no differential privacy in this run (privacy.mode {mode!r}, client-dp {client_dp!r})")
    else:
        head = ["round", *hospitals] + (["client-level ε"] if client_level else [])
        width = max(8, *(len(h) for h in head))
        lines.append("  ".join(f"{h:>{width}}" for h in head))
        for entry in rounds:
            spent = entry.privacy.sample_level_epsilon
            row = [str(entry.round)] + [_fmt(spent.get(name)) for name in hospitals]
            if client_level:
                level = entry.privacy.client_level
                row.append(_fmt(level.epsilon if level is not None else None))
            lines.append("  ".join(f"{cell:>{width}}" for cell in row))
    if privacy is None or summary is None:
        return "\n".join(lines)
    for name, ledger in privacy.hospitals.items():
        refused = list(ledger.rounds_refused)
        lines.append(
            f"{name}: ε {ledger.epsilon:.3f} of {ledger.target_epsilon:g} at δ {ledger.delta:.2g}; "
            f"noise multiplier {ledger.noise_multiplier:.3f}, sample rate {ledger.sample_rate:.4f}, "
            f"{ledger.steps} DP-SGD steps in {len(ledger.rounds_trained)} round(s)"
            + (f"; refused rounds {refused}" if refused else "")
        )
    level = privacy.client_level
    if level is not None:
        lines.append(
            f"client-level ({privacy.client_dp}): ε {level.epsilon:.3f} at δ {level.delta:.2g} for one hospital "
            f"added or removed (ε {level.epsilon_replace_one:.3f} for one hospital's data replaced) after "
            f"{level.releases} release(s), noise multiplier {level.noise_multiplier:g}, no sampling amplification "
            f"claimed, clipping norm {level.clipping_norm:.4g}"
        )
    audit = privacy.audit
    if audit is not None:
        per = "  ".join(f"{name} {v.auc:.3f}" for name, v in audit.hospitals.items())
        lines.append(f"membership-inference audit ({audit.attack}), AUC (0.5 = nothing visible): {per}; "
                     f"mean {_fmt(audit.mean_auc)}")
    if summary.sent_by_hospital:
        lines.append("what left each hospital (the only arrays it sent; metrics are scalars):")
        for name, item in summary.sent_by_hospital.items():
            lines.append(f"  {name}: {len(item.tensors)} tensors ({_tensor_groups(item.tensors)}), "
                         f"{item.bytes_up} bytes up over the run")
    return "\n".join(lines)


def _finish(axes: Axes, title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.set_title(title, fontsize=10)
    axes.set_xlabel("round")
    axes.set_ylabel("ε")
    axes.grid(alpha=0.3)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=7)


def plot_epsilon(
    rounds: Sequence[RoundEntry],
    path: Path,
    *,
    hospitals: Sequence[str] | None = None,
    budgets: Mapping[str, float] | None = None,
    client_label: str = "client-level",
    skip_empty: bool = False,
) -> Path | None:
    """ε spent per round: each hospital's sample-level ε (DP-SGD), and the client-level ε, one panel each.

    Parameters
    ----------
    rounds : list of RoundEntry
        The run's rounds (:attr:`fedfm.rundir.RunFiles.rounds`).
    path : Path
        The PNG file to write.
    hospitals : list of str, optional
        The order of the hospitals (their colours); sorted names by default.
    budgets : dict of str to float, optional
        Each hospital's budget (``privacy.target-epsilon`` or ``hospital-epsilon``), drawn dashed.
    client_label : str
        The client-level line's label (the ``privacy.client-dp`` mode).
    skip_empty : bool
        Write nothing and return None for a run without differential privacy
        (``fedfm report``); otherwise an empty plot is written.

    Returns
    -------
    Path or None
        ``path``; None when ``skip_empty`` and there was nothing to draw.

    Raises
    ------
    ReportError
        ``path`` does not end in ``.png``, or cannot be written (the message names it).
    """
    if path.suffix.lower() != PLOT_SUFFIX:
        raise ReportError(f"--plot {path}: the plot is a PNG image, so the file name must end in '.png'")
    spent = {n for entry in rounds for n in entry.privacy.sample_level_epsilon}
    names = [n for n in (hospitals if hospitals is not None else sorted(spent)) if n in spent]
    client = [(e.round, e.privacy.client_level.epsilon) for e in rounds if e.privacy.client_level is not None]
    panels = int(bool(names)) + int(bool(client))
    if not panels and skip_empty:
        return None
    # A Figure of its own (no pyplot): no global state, no display, Agg canvas by default.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(5.0, 4.2 * max(panels, 1)), 3.4), layout="constrained")
    axes = list(figure.subplots(1, max(panels, 1), squeeze=False).flat)
    if names:
        for index, name in enumerate(names):
            color = f"C{index % 10}"
            xs = [e.round for e in rounds if name in e.privacy.sample_level_epsilon]
            ys = [e.privacy.sample_level_epsilon[name] for e in rounds if name in e.privacy.sample_level_epsilon]
            axes[0].plot(xs, ys, marker="o", color=color, label=name)
            target = (budgets or {}).get(name)
            if target is not None:
                axes[0].axhline(target, color=color, linestyle="--", linewidth=0.8, alpha=0.6)
        _finish(axes[0], "Sample-level ε (DP-SGD; dashed: budget)" if budgets else "Sample-level ε (DP-SGD)")
    if client:
        axes[-1].plot([x for x, _ in client], [y for _, y in client], marker="s", color="black", label=client_label)
        _finish(axes[-1], "Client-level ε (whole hospitals)")
    if not panels:
        _finish(axes[0], "Privacy ledger (no differential privacy in this run)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110)
    except OSError as err:
        raise ReportError(f"--plot {path} cannot be written: {err.strerror or err}; choose another path") from err
    return path
