"""A real PostgreSQL 16 server for tests and benchmarks, started in about a second.

The binaries come from PyPI's ``pgserver`` wheel, so nothing is needed from the
system's packages. Only the binaries are used: this module runs ``initdb`` and
``postgres`` itself, because tests need what pgserver's own wrapper does not
give: a known TCP port that survives a restart (so a client's DSN stays valid),
and a real crash (SIGKILL) followed by WAL recovery on the same data directory.
initdb runs once per process; each server starts from a copy of that cluster.

PostgreSQL refuses to run as root. When the tests run as root (containers, CI
sandboxes), both programs run as an unprivileged system user, which owns the
data and socket directories; the base directory must then be reachable by that
user, which ``PostgresServer.temporary()`` takes care of.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import IO, Literal, Self

import psycopg
from psycopg import sql

with warnings.catch_warnings():
    # Importing pgserver builds its own server class, which looks up a runtime
    # directory and warns when XDG_RUNTIME_DIR is unset; that class is unused here.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
    # The wheel's bin directory; the package itself does not export it.
    from pgserver._commands import POSTGRES_BIN_PATH

SYSTEM_USER = "pgserver"
"""The unprivileged user that runs PostgreSQL when this process is root."""

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0

# Suited to tests: room for many pools at once, a small buffer cache, a quiet log.
# fsync and synchronous_commit stay on, so a commit that returned survives kill().
SETTINGS = {
    "max_connections": "200",
    "shared_buffers": "128MB",
    "fsync": "on",
    "synchronous_commit": "on",
    "log_min_messages": "warning",
    "logging_collector": "off",
}

StopMode = Literal["smart", "fast", "immediate"]
# The postmaster's own signals for pg_ctl's three shutdown modes.
_STOP_SIGNALS: dict[StopMode, signal.Signals] = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@functools.cache
def _system_user() -> pwd.struct_passwd | None:
    """The user PostgreSQL runs as when this process is root (created if missing); None otherwise."""
    if os.geteuid() != 0:
        return None
    from pgserver.utils import ensure_user_exists  # `useradd` unless the user exists

    return ensure_user_exists(SYSTEM_USER)


def _chown(path: Path) -> None:
    user = _system_user()
    if user is not None:
        os.chown(path, user.pw_uid, user.pw_gid)


def _spawn(command: list[str], cwd: Path, output: int | IO[bytes]) -> subprocess.Popen[bytes]:
    """Start one of PostgreSQL's programs as the system user (when root), without the caller's PG* variables."""
    user = _system_user()
    return subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
        # Its own process group: a Ctrl-C meant for pytest leaves shutting down to the fixtures.
        process_group=0,
        user=None if user is None else user.pw_uid,
        group=None if user is None else user.pw_gid,
        extra_groups=None if user is None else [],
    )


def _initdb(data_dir: Path) -> None:
    data_dir.mkdir(mode=0o700)
    _chown(data_dir)
    # --locale=C: the same collation everywhere, whatever locales the machine has.
    command = [
        str(POSTGRES_BIN_PATH / "initdb"),
        "--auth=trust", "-U", "postgres", "--encoding=utf8", "--locale=C", "-D", str(data_dir),
    ]  # fmt: skip
    process = _spawn(command, data_dir.parent, subprocess.PIPE)
    output, _ = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"initdb failed ({process.returncode}):\n{output.decode(errors='replace')}")


@functools.cache
def _template_data_dir() -> Path:
    """A data directory made by initdb once per process, removed at exit.

    Each server's data directory is a copy of it: ``cp -a`` takes ~50 ms where
    initdb takes 0.5-1.5 s, which matters for tests that each want their own server.
    """
    base = Path(tempfile.mkdtemp(prefix="pg-template-"))
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    _make_reachable(base)
    _initdb(base / "data")
    return base / "data"


def _make_reachable(base_dir: Path) -> None:
    """Let the system user (when root) through ``base_dir`` (0o755; root keeps it) and check its parents."""
    if _system_user() is None:
        return
    base_dir.chmod(0o755)
    for parent in base_dir.resolve().parents:
        if not parent.stat().st_mode & 0o001:
            raise ValueError(
                f"{parent} is not traversable by others, so {SYSTEM_USER!r} cannot reach {base_dir}; "
                "use PostgresServer.temporary() or a base directory under a 0o755 tree"
            )


class PostgresServer:
    """One PostgreSQL cluster in ``base_dir``, listening on 127.0.0.1 only.

    ``start()`` makes the data directory the first time; ``stop()``, ``kill()`` and ``restart()``
    keep the data directory and the port, so a DSN from ``dsn()`` is valid across
    them. ``close()`` stops the server and removes ``base_dir``.
    """

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = Path(base_dir)
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "sock"
        self.log_path = self.data_dir / "postgres.log"
        self.port = _free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self.base_dir.mkdir(parents=True, exist_ok=True)
        _make_reachable(self.base_dir)

    @classmethod
    def temporary(cls) -> Self:
        """A server in a new directory right under the system's temporary directory, which every user can reach."""
        return cls(Path(tempfile.mkdtemp(prefix="pg-")))

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> Self:
        """Start the postmaster (making the data directory first if new); return once it accepts connections."""
        if self.running:
            return self
        if not (self.data_dir / "PG_VERSION").exists():
            shutil.rmtree(self.data_dir, ignore_errors=True)  # what a failed first start left
            # -a: as root this keeps the system user as the owner, and 0o700, which postgres insists on.
            subprocess.run(["cp", "-a", str(_template_data_dir()), str(self.data_dir)], check=True)
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        _chown(self.socket_dir)
        command = [
            str(POSTGRES_BIN_PATH / "postgres"),
            "-D", str(self.data_dir),
            "-h", "127.0.0.1",
            "-p", str(self.port),
            "-k", str(self.socket_dir),
        ]  # fmt: skip
        for name, value in SETTINGS.items():
            command += ["-c", f"{name}={value}"]
        with self.log_path.open("ab") as log:
            _chown(self.log_path)
            self._process = _spawn(command, self.base_dir, log)
        self._wait_until_ready()
        return self

    def stop(self, mode: StopMode = "fast") -> None:
        """Shut down as ``pg_ctl stop -m mode`` would.

        fast rolls back open transactions and checkpoints; immediate skips the
        checkpoint, so the next start() replays the WAL, much as after kill().
        """
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(_STOP_SIGNALS[mode])
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"PostgreSQL did not stop ({mode}) within {STOP_TIMEOUT:.0f} s; killed it") from None

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend: a crash; the next start() recovers from the WAL.

        The backends call setsid(), so a process-group kill would miss them; left
        alone they exit on noticing the postmaster's death, but one still attached to
        the shared memory makes the next start() fail. So: freeze the postmaster (it
        alone forks), kill it and its children, and wait until they are gone.
        """
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGSTOP)
        children = _children(process.pid)
        process.kill()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.01)

    def restart(self, mode: StopMode = "fast") -> Self:
        """Stop (if running) and start again on the same port and data directory."""
        self.stop(mode)
        return self.start()

    def create_database(self, name: str) -> str:
        """CREATE DATABASE ``name`` (CREATE DATABASE cannot run in a transaction, hence autocommit); return its DSN."""
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def password_database(self, name: str, role: str, password: str) -> str:
        """A database ``name`` owned by a LOGIN ``role`` that must give ``password`` over TCP
        (scram-sha-256, as a managed PostgreSQL asks; the other roles keep trust). Restarts
        the server to load the rule. Returns the DSN without the password."""
        self.create_database(name)
        with psycopg.connect(self.dsn(), autocommit=True) as admin:
            admin.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(password))
            )
            admin.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(name), sql.Identifier(role)))
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        self.restart()
        return f"postgresql://{role}@127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        """Stop the server (killing it if a clean stop fails) and remove ``base_dir``."""
        try:
            self.stop()
        finally:
            self.kill()
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PostgresServer({self.dsn()}, running={self.running}, data_dir={self.data_dir})"

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            code = self._process.poll()
            if code is not None:
                raise RuntimeError(f"PostgreSQL exited with {code} while starting; log:\n{self.log_tail()}")
            try:
                with psycopg.connect(self.dsn(), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(
                        f"PostgreSQL did not accept connections within {START_TIMEOUT:.0f} s; log:\n{self.log_tail()}"
                    ) from None
                time.sleep(0.02)


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name (state, ppid, ...), or None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and fields[1] == str(pid):
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """Still running: a zombie has already exited and let go of the shared memory."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"
