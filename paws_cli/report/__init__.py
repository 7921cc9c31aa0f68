"""`paws report`: plots and one HTML page from run directories (see :mod:`paws_cli.report.command`)."""

from paws_cli.report.command import write_report

__all__ = ["write_report"]
