"""The gateway as a separate process, as callers, containers and Kubernetes see it; the Dockerfile read."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the dev venv's bin: metering-gateway lives here
SERVE = [sys.executable, "-m", "gateway", "serve"]


def free_port() -> int:
    """A port nothing listens on right now, for commands that cannot take port 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tool_env(**extra: str) -> dict[str, str]:
    """The environment with the dev venv first on PATH and no METERING_GATEWAY_* leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERING_GATEWAY_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


class GatewayProcess:
    """A running ``metering-gateway serve``; its stdout JSON lines are collected as they come."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str]) -> None:
        self.proc = subprocess.Popen(
            list(argv), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
        )
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.raw.append(line)
                try:
                    self.lines.append(json.loads(line))
                except ValueError:
                    pass
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> dict[str, Any]:
        """The first log line matching ``pred``; fails if the process ends or time runs out."""
        end = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if pred(line):
                        return line
                left = end - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no matching log line; exit={self.proc.poll()} output:\n{''.join(self.raw)}")
                self._changed.wait(min(left, 0.5))

    @property
    def target(self) -> str:
        return str(self.wait_for(lambda e: e.get("event") == "serving")["listen"])

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@contextmanager
def gateway_process(*flags: str, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Iterator[GatewayProcess]:
    """``metering-gateway serve --local --listen 127.0.0.1:0 FLAGS``, serving when yielded."""
    command = list(argv) if argv is not None else [*SERVE, "--local", "--listen", "127.0.0.1:0", *flags]
    gw = GatewayProcess(command, env if env is not None else tool_env())
    try:
        gw.target  # waits for the "serving" line
        yield gw
    finally:
        if gw.proc.poll() is None:
            gw.terminate()
        gw._reader.join(5)


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str

    @property
    def exec_form(self) -> list[str]:
        """The JSON argv of ``CMD [...]``, after any options (``--interval=10s CMD``)."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            _, _, text = text.partition("CMD ")
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"{self.keyword} is not exec form"
        return value


def parse_dockerfile(text: str) -> list[list[Instruction]]:
    """Stages of instructions; joins ``\\`` continuations, drops comments."""
    stages: list[list[Instruction]] = [[]]
    logical = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        if logical.strip():
            keyword, _, args = logical.strip().partition(" ")
            instruction = Instruction(keyword.upper(), " ".join(args.split()))
            if instruction.keyword == "FROM":
                stages.append([])
            stages[-1].append(instruction)
        logical = ""
    return stages


def first(stage: list[Instruction], keyword: str) -> Instruction:
    [found] = [i for i in stage if i.keyword == keyword]
    return found
