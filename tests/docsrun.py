"""Run one page's code blocks in order, as a reader would: ``python docsrun.py SPEC.json``.

Started by tests/test_docs_snippets.py in a fresh directory (the page's working directory),
one interpreter per page, so the page's Python blocks share one namespace. The spec lists
the page's steps (already rewritten to the test's services): files to write, Python to
exec, shell to run. Long-running commands run in the background until the page ends.
The conventions are described in tests/docsnippets.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path
from typing import Any

SERVICE = re.compile(r"^(outboxer\s+relay|outboxer-inbox)\b")
STARTED = re.compile(r"\bstarted\b")
STOP_GRACE = 20.0
STARTED_AT = time.monotonic()


class PageFailed(Exception):
    pass


class Background:
    """A long-running command of a shell block: started, waited for, stopped at the end."""

    def __init__(self, command: str, where: str, log_dir: Path, index: int) -> None:
        self.command = command
        self.where = where
        self.log_path = log_dir / f"background-{index}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            ["bash", "-c", f"exec {command}"],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_started(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not STARTED.search(self.output()):
            if self.process.poll() is not None:
                raise PageFailed(
                    f"{self.where}: `{self.command}` exited ({self.process.returncode}) before "
                    f"it started:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise PageFailed(f"{self.where}: `{self.command}` did not start:\n{self.output()}")
            time.sleep(0.1)

    def stop(self) -> str | None:
        """SIGTERM, as an operator would; a complaint if it did not stop cleanly."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                return f"`{self.command}` did not stop within {STOP_GRACE:.0f} s of SIGTERM"
        self._log.close()
        output = self.output()
        if self.process.returncode != 0:
            return f"`{self.command}` exited with {self.process.returncode}"
        if "Traceback" in output:
            return f"`{self.command}` logged a traceback"
        return None


def logical_lines(code: str) -> list[str]:
    """Shell lines with backslash continuations joined."""
    lines: list[str] = []
    pending = ""
    for raw in code.splitlines():
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        lines.append(pending + raw)
        pending = ""
    if pending:
        lines.append(pending)
    return lines


def command_of(line: str) -> str:
    """The command on a shell line, without its comment ("" for a comment or a blank)."""
    stripped = line.strip()
    if stripped.startswith("#"):
        return ""
    cut = stripped.find(" #")
    return (stripped[:cut] if cut != -1 else stripped).strip()


class Page:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.page: str = spec["page"]
        self.steps: list[dict[str, Any]] = spec["steps"]
        self.finally_check: str | None = spec.get("check")
        # A real module, so that libraries resolving names through sys.modules (SQLAlchemy's
        # Mapped[...] annotations, dataclasses) find what the page's blocks defined.
        module = types.ModuleType("__main__")
        sys.modules["__main__"] = module
        self.namespace: dict[str, Any] = module.__dict__
        self.background: list[Background] = []
        self.log_dir = Path(tempfile.mkdtemp(prefix="docs-logs-"))

    def run(self) -> None:
        try:
            for step in self.steps:
                where = f"{self.page}:{step['line']}"
                print(
                    f"--- {where} ({step['kind']}) at {time.monotonic() - STARTED_AT:.1f} s",
                    flush=True,
                )
                getattr(self, f"run_{step['kind']}")(step, where)
            if self.finally_check:
                print(f"--- {self.page}: the test's check", flush=True)
                exec(compile(self.finally_check, f"check of {self.page}", "exec"), self.namespace)
        finally:
            print(f"--- stopping at {time.monotonic() - STARTED_AT:.1f} s", flush=True)
            problems = [p for p in (b.stop() for b in self.background) if p]
            print(f"--- stopped at {time.monotonic() - STARTED_AT:.1f} s", flush=True)
            for process in self.background:
                print(f"--- {process.where}: output of `{process.command}`\n{process.output()}")
            if problems:
                raise PageFailed("; ".join(problems))

    def run_file(self, step: dict[str, Any], where: str) -> None:
        path = Path(step["title"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(step["code"])
        # A package's parents become packages too: myapp/models.py needs myapp/__init__.py.
        for parent in path.parents:
            if str(parent) not in (".", "") and path.suffix == ".py":
                (parent / "__init__.py").touch()

    def run_python(self, step: dict[str, Any], where: str) -> None:
        # Leading newlines make tracebacks point at the page's own line numbers.
        code = "\n" * step["line"] + step["code"]
        exec(compile(code, self.page, "exec"), self.namespace)

    def run_shell(self, step: dict[str, Any], where: str) -> None:
        chunk: list[str] = []
        for line in logical_lines(step["code"]):
            command = command_of(line)
            if command.startswith("pip install"):
                print(f"(not run: {command})")
                continue
            background = command.endswith("&") and not command.endswith("&&")
            if background:
                command = command[:-1].strip()
            elif SERVICE.match(command) and "--once" not in command.split():
                background = True
            if not background:
                chunk.append(line)
                continue
            self.run_chunk(chunk, where)
            chunk = []
            process = Background(command, where, self.log_dir, len(self.background))
            self.background.append(process)
            process.wait_started()
        self.run_chunk(chunk, where)

    def run_chunk(self, lines: list[str], where: str) -> None:
        if not any(command_of(line) for line in lines):
            return
        env_file = self.log_dir / "env"
        script = (
            "set -eo pipefail\n" + "\n".join(lines) + f"\nenv -0 > {shlex.quote(str(env_file))}\n"
        )
        done = subprocess.run(
            ["bash", "-c", script],
            input="y\n" * 20,  # a reader answers the confirmations
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        sys.stdout.write(done.stdout)
        sys.stdout.write(done.stderr)
        if done.returncode != 0:
            raise PageFailed(f"{where}: the shell block failed with exit status {done.returncode}")
        exported = env_file.read_bytes().split(b"\0")
        os.environ.clear()
        for item in exported:
            if b"=" in item:
                name, _, value = item.decode().partition("=")
                os.environ[name] = value


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    # The page's directory, not this script's (tests/ must not be importable by pages).
    sys.path[0] = os.getcwd()
    page = Page(spec)
    try:
        page.run()
    except PageFailed as exc:
        print(f"FAILED: {exc}", flush=True)
        return 1
    except BaseException:
        traceback.print_exc()
        print(f"FAILED: a Python block of {spec['page']} raised (traceback above)", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
