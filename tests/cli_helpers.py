"""Run the real entry point (`aiqueue.cli.app.main`, with its one error catch point) in-process,
capturing stdout, stderr and the exit code as the shell would see them."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from typer.testing import CliRunner

from aiqueue.cli.app import main


@dataclass(frozen=True)
class Run:
    args: tuple[str, ...]
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        assert self.code == 0, f"{self.args} exited {self.code}: {self.stderr}"
        return json.loads(self.stdout)

    def error(self) -> dict[str, Any]:
        """The JSON error object on stderr (for runs with --json that failed)."""
        assert self.stdout == "", f"stdout must stay empty on error, got {self.stdout!r}"
        payload = json.loads(self.stderr)
        assert set(payload) == {"error"}
        return payload["error"]  # type: ignore[no-any-return]


def run_cli(*args: str, input: bytes | str | None = None) -> Run:
    with CliRunner().isolation(input=input) as (out, err, _mixed):
        try:
            main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        else:  # pragma: no cover - main() always exits
            code = -1
        sys.stdout.flush()
        sys.stderr.flush()
        stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    return Run(tuple(args), code, stdout, stderr)
