"""The `jaxserve` command line run in the test's own process."""

from __future__ import annotations

from jaxserve.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of `jaxserve ARGV...` (`capsys`: pytest's capture)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err
