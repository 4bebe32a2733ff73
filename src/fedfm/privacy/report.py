"""``fedfm privacy-report RUN_DIR``: the privacy ledger of a run as a table (and a plot).

Reads only the run directory (``metrics.jsonl``, ``summary.json``): ε each
hospital reported every round (sample-level DP-SGD), the client-level ε of
the server's ledger, the membership-inference audit, and what left each
hospital (tensor names and bytes). The command reads the run through
:func:`fedfm.report.read_run`, as ``fedfm report`` does (a corrupt file is
named, a round written twice by a resumed run counts once); this module only
lays the ledger out.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from fedfm.errors import FedfmError

#: The only file type ``--plot`` writes.
PLOT_SUFFIX = ".png"


class ReportError(FedfmError, ValueError):
    """A run directory lacks what the report needs, or a report file cannot be written."""


def load_run(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rounds of ``metrics.jsonl`` and the ``summary.json`` of a run (an empty summary while it runs).

    A plain reader for notebooks; ``fedfm privacy-report`` reads through
    :func:`fedfm.report.read_run`, which names a corrupt file and keeps the
    later line of a round written twice (this module, in layer 2, cannot import it).
    """
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(f"{run_dir} is not a fedfm run directory: it has no metrics.jsonl")
    rounds = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return rounds, summary


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _tensor_groups(names: list[str]) -> str:
    """``lora_A.weight x12, lora_B.weight x12, classifier.weight x1``: what kinds of tensors, how many."""
    kinds = Counter(".".join(name.split(".")[-2:]) for name in names)
    return ", ".join(f"{kind} x{count}" for kind, count in sorted(kinds.items()))


def ledger_table(rounds: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """The ledger as plain text: one row per round, one ε column per hospital, then the totals."""
    hospitals = sorted({name for entry in rounds for name in entry.get("privacy", {}).get("sample_level_epsilon", {})})
    client_level = any("client_level" in entry.get("privacy", {}) for entry in rounds)
    privacy = summary.get("privacy", {})
    lines = []
    if not hospitals and not client_level:
        lines.append(f"no differential privacy in this run (privacy.mode {privacy.get('mode', 'none')!r}, "
                     f"client-dp {privacy.get('client_dp', 'none')!r})")
    else:
        head = ["round", *hospitals] + (["client-level ε"] if client_level else [])
        width = max(8, *(len(h) for h in head))
        lines.append("  ".join(f"{h:>{width}}" for h in head))
        for entry in rounds:
            spent = entry.get("privacy", {}).get("sample_level_epsilon", {})
            row = [str(entry["round"])] + [_fmt(spent.get(name)) for name in hospitals]
            if client_level:
                row.append(_fmt(entry.get("privacy", {}).get("client_level", {}).get("epsilon")))
            lines.append("  ".join(f"{cell:>{width}}" for cell in row))
    for name, ledger in privacy.get("hospitals", {}).items():
        refused = ledger.get("rounds_refused") or []
        lines.append(
            f"{name}: ε {ledger['epsilon']:.3f} of {ledger['target_epsilon']:g} at δ {ledger['delta']:.2g}; "
            f"noise multiplier {ledger['noise_multiplier']:.3f}, sample rate {ledger['sample_rate']:.4f}, "
            f"{ledger['steps']} DP-SGD steps in {len(ledger['rounds_trained'])} round(s)"
            + (f"; refused rounds {refused}" if refused else "")
        )
    level = privacy.get("client_level")
    if level:
        lines.append(
            f"client-level ({privacy.get('client_dp')}): ε {level['epsilon']:.3f} at δ {level['delta']:.2g} after "
            f"{level['releases']} release(s), noise multiplier {level['noise_multiplier']:g}, "
            f"hospitals sampled per round {level['sample_rate']:.2f}, clipping norm {level['clipping_norm']:.4g}"
        )
    audit = privacy.get("audit")
    if audit:
        per = "  ".join(f"{name} {v['auc']:.3f}" for name, v in audit["hospitals"].items())
        lines.append(f"membership-inference audit ({audit['attack']}), AUC (0.5 = nothing visible): {per}; "
                     f"mean {_fmt(audit.get('mean_auc'))}")
    sent = summary.get("sent_by_hospital", {})
    if sent:
        lines.append("what left each hospital (the only arrays it sent; metrics are scalars):")
        for name, item in sent.items():
            lines.append(f"  {name}: {len(item['tensors'])} tensors ({_tensor_groups(item['tensors'])}), "
                         f"{item['bytes_up']} bytes up over the run")
    return "\n".join(lines)


def plot_epsilon(rounds: list[dict[str, Any]], path: Path) -> Path:
    """A PNG of ε over rounds (one line per hospital, plus the client-level ε).

    Raises
    ------
    ReportError
        ``path`` does not end in ``.png``, or cannot be written (the message names it).
    """
    if path.suffix.lower() != PLOT_SUFFIX:
        raise ReportError(f"--plot {path}: the plot is a PNG image, so the file name must end in '.png'")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    hospitals = sorted({n for entry in rounds for n in entry.get("privacy", {}).get("sample_level_epsilon", {})})
    x = [entry["round"] for entry in rounds]
    for name in hospitals:
        axes.plot(x, [entry.get("privacy", {}).get("sample_level_epsilon", {}).get(name) for entry in rounds],
                  marker="o", label=name)
    client = [entry.get("privacy", {}).get("client_level", {}).get("epsilon") for entry in rounds]
    if any(v is not None for v in client):
        axes.plot(x, client, marker="s", linestyle="--", color="black", label="client-level")
    axes.set_xlabel("round")
    axes.set_ylabel("ε spent")
    axes.set_title("Privacy ledger")
    axes.grid(alpha=0.3)
    if hospitals or any(v is not None for v in client):
        axes.legend(fontsize=8)
    figure.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
    except OSError as err:
        raise ReportError(f"--plot {path} cannot be written: {err.strerror or err}; choose another path") from err
    finally:
        plt.close(figure)
    return path
