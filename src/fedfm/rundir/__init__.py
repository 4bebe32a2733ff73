"""The run directory: its one owner (records, writer, reader, checkpoints, claim).

- :mod:`~fedfm.rundir.records`: what a run writes, typed (a round's line, a hospital's entry in it, the summary);
- :mod:`~fedfm.rundir.directory`: :class:`RunDirectory`, the writer (config, metrics lines, summary, checkpoints);
- :mod:`~fedfm.rundir.reader`: :func:`read_run`, the one reader;
- :mod:`~fedfm.rundir.checkpoint`: checkpoint files, checksummed, and reading the newest back;
- :mod:`~fedfm.rundir.lock`: :func:`claim`, one process at a time per run directory;
- :mod:`~fedfm.rundir.files`: atomic writes and the default run directory's name.
"""

from fedfm.rundir.checkpoint import (
    CONFIG_KEY,
    STATE_KEY,
    Checkpoint,
    completed_round,
    read_checkpoint,
    write_checkpoint,
)
from fedfm.rundir.directory import RunDirectory, round_line, summary_text
from fedfm.rundir.files import (
    CONFIG_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    atomic_write_bytes,
    atomic_write_text,
    default_run_dir,
)
from fedfm.rundir.lock import LOCK_FILE, RUN_MARKERS, check_usable, claim
from fedfm.rundir.reader import RunFiles, read_rounds, read_run, read_summary
from fedfm.rundir.records import (
    Audit,
    AuditScore,
    ClientLevel,
    FinalScores,
    HospitalEntry,
    HospitalPrivacy,
    HospitalRows,
    Metrics,
    PrivacySummary,
    RoundEntry,
    RoundPrivacy,
    RoundScores,
    RunSummary,
    Selection,
    SentByHospital,
)

__all__ = [
    "CONFIG_FILE", "CONFIG_KEY", "LOCK_FILE", "METRICS_FILE", "RUN_MARKERS", "STATE_KEY", "SUMMARY_FILE", "Audit",
    "AuditScore", "Checkpoint", "ClientLevel", "FinalScores", "HospitalEntry", "HospitalPrivacy", "HospitalRows",
    "Metrics", "PrivacySummary", "RoundEntry", "RoundPrivacy", "RoundScores", "RunDirectory", "RunFiles", "RunSummary",
    "Selection", "SentByHospital", "atomic_write_bytes", "atomic_write_text", "check_usable", "claim",
    "completed_round", "default_run_dir", "read_checkpoint", "read_rounds", "read_run", "read_summary",
    "round_line", "summary_text", "write_checkpoint",
]
