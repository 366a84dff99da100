"""The README's examples run, so they cannot rot.

Marker: an HTML comment `<!-- test: run -->` on the line before a fenced block.
- ```sh blocks: every line that is not empty or a comment is one command line.
- ```console blocks: lines starting with `$ ` are command lines; the lines after one, up to the
  next `$ `, are its expected stdout: each must appear, in order, among the output lines (spaces
  collapsed); a line `...` stands for any number of lines, and a line ending in `...` matches
  any line that starts with the text before it (for paths, times and ids).
- A command line ending in `# exit N` must exit N; every other one must exit 0.

Marked blocks run in README order, one bash per line, in one temp directory that is also HOME (so
the default SQLite database lands there), with exported variables carried from line to line, the
venv's bin first on PATH, and a fake RunningHub on 127.0.0.1 standing in for RunningHub, as the
README's rehearsal says: the directory's config.example.toml is the repository's with
provider.base_url pointing at the fake. A `body.json` that a line needs and nobody wrote is the
fake's TASK_END webhook for the newest running job, i.e. what RunningHub would POST.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
BIN = Path(sys.executable).parent
BLOCK = re.compile(r"^<!--\s*test:\s*run\s*-->[ \t]*\n```(\w+)[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
EXIT = re.compile(r"#\s*exit\s+(\d+)\s*$")


@dataclass
class Command:
    line: str
    lineno: int
    expected: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        match = EXIT.search(self.line)
        return int(match.group(1)) if match else 0


def marked_commands(text: str) -> list[Command]:
    commands: list[Command] = []
    for match in BLOCK.finditer(text):
        language, body = match.group(1), match.group(2)
        first = text.count("\n", 0, match.start(2)) + 1
        for offset, raw in enumerate(body.splitlines()):
            line, lineno = raw.rstrip(), first + offset
            if language == "console":
                if line.startswith("$ "):
                    commands.append(Command(line[2:], lineno))
                elif line.strip() and commands:
                    commands[-1].expected.append(line)
            elif language == "sh":
                if line.strip() and not line.lstrip().startswith("#"):
                    commands.append(Command(line, lineno))
            else:
                raise AssertionError(f"README.md:{first}: a marked block must be sh or console, not {language}")
    return commands


def _squash(line: str) -> str:
    return " ".join(line.split())


def output_problem(expected: list[str], stdout: str) -> str | None:
    """None when the expected lines appear in order in stdout (`...` skips any lines)."""
    actual = [_squash(line) for line in stdout.splitlines()]
    position = 0
    for want in expected:
        if want.strip() == "...":
            continue
        squashed = _squash(want)
        if squashed.endswith("..."):
            prefix = squashed[:-3].rstrip()
            found = [i for i in range(position, len(actual)) if actual[i].startswith(prefix)]
        else:
            found = [i for i in range(position, len(actual)) if actual[i] == squashed]
        if not found:
            return f"expected line not found (in order): {want!r}"
        position = found[0] + 1
    return None


class Session:
    """One directory, one environment, one bash per command line."""

    def __init__(self, directory: Path, env: dict[str, str], hub: Any) -> None:
        self.directory, self.env, self.hub = directory, env, hub
        self.saved = directory / ".readme-env"

    def run(self, command: Command) -> subprocess.CompletedProcess[str]:
        self._fixtures(command.line)
        script = (f"[ -f {self.saved.name} ] && source {self.saved.name}\n"
                  f"{command.line}\nrc=$?\nexport -p > {self.saved.name}\nexit $rc\n")
        return subprocess.run(["bash", "--norc", "--noprofile", "-c", script], cwd=self.directory,
                              env=self.env, capture_output=True, text=True, timeout=120, check=False)

    def _fixtures(self, line: str) -> None:
        body = self.directory / "body.json"
        if re.search(r"\bbody\.json\b", line) and not body.exists():
            body.write_bytes(self.hub.finish_task(self._newest_running_task(), outputs=[
                "https://cdn.example.org/out/cat-4x.png"], deliver=False))

    def _newest_running_task(self) -> str:
        status = self.run(Command("aiqueue status --json", 0))
        assert status.returncode == 0, status.stderr
        running = json.loads(status.stdout)["running"]
        assert running, "the README sends a webhook, but no job is running"
        return str(max(running, key=lambda job: job["id"])["provider_task_id"])


def run_all(commands: list[Command], session: Session) -> list[str]:
    problems = []
    for command in commands:
        done = session.run(command)
        where = f"README.md:{command.lineno}: {command.line.strip()}"
        if done.returncode != command.exit_code:
            problems.append(f"{where}\n  exit {done.returncode}, expected {command.exit_code}; stderr: "
                            f"{done.stderr.strip()[:500]}")
            continue
        problem = output_problem(command.expected, done.stdout) if command.expected else None
        if problem:
            problems.append(f"{where}\n  {problem}; stdout was:\n{done.stdout[:2000]}")
    return problems


@pytest.fixture
def session(tmp_path: Path) -> Any:
    from aiqueue.provider.fake_server import FakeRunningHub

    example = (REPO / "config.example.toml").read_text(encoding="utf-8")
    real = 'base_url = "https://www.runninghub.ai"'
    assert real in example, "config.example.toml's provider.base_url changed: update this rehearsal"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIQUEUE_", "RUNNINGHUB_", "XDG_"))}
    env.update(HOME=str(tmp_path), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", NO_COLOR="1", COLUMNS="120")
    with FakeRunningHub() as hub:  # accepts any API key, as the README's `...` placeholder
        (tmp_path / "config.example.toml").write_text(example.replace(real, f'base_url = "{hub.base_url}"'))
        yield Session(tmp_path, env, hub)


def test_the_readme_has_marked_examples() -> None:
    commands = marked_commands(README.read_text(encoding="utf-8"))
    lines = [c.line for c in commands]
    assert any(line.startswith("aiqueue db init") for line in lines), "the walkthrough is not marked"
    assert len(commands) >= 8


def test_the_readme_examples_run(session: Session) -> None:
    commands = marked_commands(README.read_text(encoding="utf-8"))
    problems = run_all(commands, session)
    assert problems == [], "\n".join(problems)
    # The walkthrough really went through: alice's job ran, finished by the webhook, and was paid.
    ledger = session.run(Command("aiqueue credits ledger --user alice --json", 0))
    kinds = [entry["kind"] for entry in json.loads(ledger.stdout)["entries"]]
    assert kinds == ["grant", "charge"]
    job = json.loads(session.run(Command("aiqueue status 1 --json", 0)).stdout)["job"]
    assert job["status"] == "completed" and job["outputs"] == ["https://cdn.example.org/out/cat-4x.png"]


SAMPLE = """
Some text.

<!-- test: run -->
```console
$ echo "one   two"; echo three; echo /tmp/x/y
one two
...
/tmp/x...
$ false  # exit 1
$ printf 'a\\nb\\n'
b
a
```

```sh
echo never-run
```

<!-- test: run -->
```sh
# a comment line
export GREETING=hi
test "$GREETING" = hi
```
"""


def test_the_runner_checks_exit_codes_outputs_and_order(session: Session) -> None:
    commands = marked_commands(SAMPLE)
    assert [c.line for c in commands] == ['echo "one   two"; echo three; echo /tmp/x/y', "false  # exit 1",
                                          "printf 'a\\nb\\n'",
                                          "export GREETING=hi", 'test "$GREETING" = hi']
    assert [c.exit_code for c in commands] == [0, 1, 0, 0, 0]
    problems = run_all(commands, session)
    # Only the out-of-order output fails; the variable exported on one line is seen by the next.
    assert len(problems) == 1 and "expected line not found (in order): 'a'" in problems[0]
    assert "README.md:11:" in problems[0]
    assert output_problem(["/tmp/z..."], "/tmp/x/y\n") is not None and output_problem(["x"], "") is not None
    assert run_all([Command("true # exit 3", 1)], session)[0].startswith("README.md:1: true # exit 3\n  exit 0")
