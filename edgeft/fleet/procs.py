"""The Flower processes edgeft starts: environment, addresses, start, readiness and stop."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from edgeft.errors import EdgeftError

LOOPBACK_NAMES = ("localhost",)


def flower_env(home: Path) -> dict[str, str]:
    """The environment of every Flower process: its own FLWR_HOME, this Python's scripts first on
    PATH (the SuperLink and SuperNode start ``flower-superexec``, ``flwr-serverapp`` and
    ``flwr-clientapp`` by name), and no telemetry or update check (nothing leaves the machine
    but the fleet's own traffic)."""
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
        PYTHONUNBUFFERED="1",
    )
    return env


def executable(name: str) -> str:
    """A Flower command from this Python's environment (the `fleet` extra installs them)."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    raise EdgeftError(
        f"{name}: not found next to {sys.executable}; install the fleet extra: pip install 'edgeft[fleet]'"
    )


def check_address(address: str, option: str, tls: bool) -> tuple[str, int]:
    """HOST:PORT; without TLS only a loopback host (the fleet's traffic would travel in clear)."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EdgeftError(f"{option}: expected HOST:PORT, got {address!r}")
    if not tls and not _is_loopback(host):
        raise EdgeftError(
            f"{option}: {host} is not a loopback address; without TLS certificates the fleet listens and "
            "connects on 127.0.0.1 only (give certificates to use the network)"
        )
    return host, int(port)


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict[str, str], log: Path | None) -> subprocess.Popen:
    """Start ``cmd`` (its first word resolved in this environment), its output appended to ``log``
    (or inherited when None). It stays in our process group: whatever kills this device's edgeft
    process group (Ctrl-C, a supervisor, a test) kills the Flower processes with it; the helpers
    they start themselves exit when their parent does."""
    cmd = [executable(cmd[0]), *cmd[1:]]
    out = open(log, "ab") if log is not None else None  # noqa: SIM115  (the child keeps its own copy)
    try:
        return subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None, stdin=subprocess.DEVNULL
        )
    finally:
        if out is not None:
            out.close()


def stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def terminate_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so the ``finally`` blocks stop the Flower processes."""

    def handler(_sig, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def wait_port(host: str, port: int, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Wait until ``host:port`` accepts connections; fail if ``proc`` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EdgeftError(f"{proc.args[0]} exited with code {proc.returncode}: {_tail(log)}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.25)
    raise EdgeftError(f"{host}:{port}: {Path(proc.args[0]).name} did not listen within {timeout:g} s ({log})")


def _tail(log: Path) -> str:
    try:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"
