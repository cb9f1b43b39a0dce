"""Command line: the same Hydra overrides as ``python -m pipeline``; ``python -m pipeline.report`` runs ``main``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import matplotlib
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig

from pipeline import tracking
from pipeline.cli import guard
from pipeline.report.write import write_report
from pipeline.tune_storage import storage_url

CONF = tracking.REPO / "conf"


def compose_config(overrides: list[str]) -> DictConfig:
    """``conf/report.yaml`` (which composes ``conf/config.yaml``) with the overrides; a bad override is a ValueError."""
    flags = [o for o in overrides if o.startswith("-")]
    if flags:
        raise ValueError(
            f"pipeline.report takes Hydra overrides (key=value) like python -m pipeline, not {flags}; "
            "e.g. experiment=compare, report.experiment=tuned, tracking.uri=..., report.out=DIR"
        )
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name="report", overrides=overrides)
    except HydraException as e:
        raise ValueError(f"bad override(s) {' '.join(overrides)}: {e}") from e


def report(overrides: list[str]) -> list[Path]:
    """Compose the config, write the report of ``report.experiment``, print its tables; return the files."""
    cfg = compose_config(overrides)
    name = str(cfg.report.experiment)
    out_dir = Path(cfg.report.out) if cfg.report.out else tracking.REPO / "experiments" / name
    matplotlib.use("Agg")  # files only; no display needed
    tracking.connect(cfg.tracking.uri, cfg.tracking.get("http"))
    written = write_report(name, out_dir, storage_url(str(cfg.tune.storage)), bool(cfg.report.allow_mixed))
    print((out_dir / "methods.md").read_text() + "\n" + (out_dir / "precision.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    return written


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    guard(lambda: report(argv), argv)
