"""Assertions shared by the bad-input tests."""

from typer.testing import CliRunner

from acdc_cli.cli import app


def fails(args: list[str], code: int = 2) -> str:
    """Run the CLI; assert a one-line error, exit ``code`` and no traceback. Returns the line."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == code, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]
