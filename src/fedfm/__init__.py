"""fedfm: federated LoRA fine-tuning of foundation models on biomedical data.

Hospitals train LoRA adapters on their own records; only adapter tensors and
scalar metrics travel, through Flower.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedfm.config import RunConfig, load_config
from fedfm.errors import ConfigError, FedfmError

__version__ = "0.1.0"

if TYPE_CHECKING:
    from fedfm.runner import RunResult


def run(config: RunConfig | str | None = None, **kwargs: Any) -> RunResult:
    """Run a federated fine-tune; see :func:`fedfm.runner.run`."""
    from fedfm.runner import run as _run

    return _run(config, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "RunResult":
        from fedfm.runner import RunResult

        return RunResult
    raise AttributeError(name)


__all__ = ["ConfigError", "FedfmError", "RunConfig", "RunResult", "__version__", "load_config", "run"]
