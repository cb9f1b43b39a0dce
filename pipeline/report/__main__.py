"""``python -m pipeline.report [overrides]``: see ``pipeline.report.cli``."""

from pipeline.report.cli import main

main()
