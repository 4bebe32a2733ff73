"""The Flower ServerApp (``fedfm.server:app``) and the jobs it orchestrates.

- :mod:`~fedfm.server.app`: :data:`app`, :func:`make_server_app`, :func:`serve` (a run from claim to summary);
- :mod:`~fedfm.server.recorder`: each finished round's metrics line, checkpoint and progress line;
- :mod:`~fedfm.server.summary`: ``summary.json``;
- :mod:`~fedfm.server.resume`: the checkpoint a resumed run continues from;
- :mod:`~fedfm.server.asks`: after the last round, the privacy audit and the personalized scores;
- :mod:`~fedfm.server.model`: the starting adapter, and a global record put into the server's model;
- :mod:`~fedfm.server.metrics`: metric dicts combined and shown (pure).
"""

from fedfm.server.app import app, build_strategy, make_server_app, round_instructions, serve
from fedfm.server.asks import run_audit, run_personalization
from fedfm.server.model import initial_arrays, load_global
from fedfm.server.recorder import Recorder
from fedfm.server.resume import resume_point
from fedfm.server.summary import build_summary, privacy_summary, selection_json, selection_summary

__all__ = [
    "Recorder", "app", "build_strategy", "build_summary", "initial_arrays", "load_global", "make_server_app",
    "privacy_summary", "resume_point", "round_instructions", "run_audit", "run_personalization",
    "selection_json", "selection_summary", "serve",
]
