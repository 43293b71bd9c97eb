"""Several ``tandem serve`` processes sharing one port (``tandem serve --processes N``).

A request's work is Python that holds the GIL, so one process serves about one core's
worth of requests however many threads it has. To use more cores, this supervisor
starts ``N`` ordinary ``tandem serve`` processes bound to the same address with
``SO_REUSEPORT`` (the kernel spreads connections among them), each with its own engine,
hot-reload watcher and, if asked, its own metrics port (``metrics_port + i``).

It reserves the port first (so ``--port 0`` picks one port for all), reports it once
every process serves, forwards SIGTERM/SIGINT so that each process shuts down
gracefully, and stops them all if one dies (a process supervisor such as systemd then
restarts the whole group). ``Reload`` reaches the process that answers it; the others
pick the new version up through their watch of ``current``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from engine.errors import ServeError


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, non-listening ``SO_REUSEPORT`` socket holding ``port`` (0: any free one)
    until the servers have joined it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # First without SO_REUSEPORT: fails when anything else holds the port, so that this
    # group never shares it with another server.
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ServeError(f"cannot serve on {host}:{port}: {e.strerror}") from None
        port = probe.getsockname()[1]
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((host, port))
    return holder


def serve_processes(
    n: int,
    child_command: list[str],
    host: str,
    port: int,
    metrics_port: int | None,
    port_file: str | None,
    start_timeout: float = 300.0,
    stop_timeout: float = 60.0,
) -> int:
    """Run ``n`` copies of ``child_command`` (a ``tandem serve`` command line without
    ``--port``, ``--metrics-port`` and ``--port-file``) on one port until SIGTERM or
    SIGINT; returns the exit code (0 when every process stopped cleanly). A process still
    running ``stop_timeout`` seconds after its SIGTERM is killed (and the code is 1), so
    one stuck shutdown cannot keep the group, and its port, alive."""
    holder = reserve_port(host, port)
    port = holder.getsockname()[1]
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with tempfile.TemporaryDirectory(prefix="tandem-serve-") as tmp:
        children = []
        for i in range(n):
            metrics = [] if metrics_port is None else ["--metrics-port", str(metrics_port + i if metrics_port else 0)]
            ready = Path(tmp) / f"port-{i}"
            children.append(
                (subprocess.Popen([*child_command, "--port", str(port), *metrics, "--port-file", str(ready)]), ready)
            )
        stopped_on_request = False
        try:
            deadline = time.monotonic() + start_timeout
            while not all(ready.exists() for _, ready in children):
                failed = [child.pid for child, _ in children if child.poll() is not None]
                if failed or time.monotonic() > deadline or stop.is_set():
                    print(
                        f"tandem serve: a server process {'exited' if failed else 'did not start'}; stopping",
                        file=sys.stderr,
                        flush=True,
                    )
                    return 1
                time.sleep(0.1)
            holder.close()  # every server has bound the port
            if port_file:
                Path(port_file).write_text(f"{port}\n")
            print(
                f"serving on {host}:{port} with {n} processes (pids {', '.join(str(c.pid) for c, _ in children)})",
                file=sys.stderr,
                flush=True,
            )
            while not stop.wait(0.5):
                if any(child.poll() is not None for child, _ in children):
                    print("tandem serve: a server process exited; stopping the others", file=sys.stderr, flush=True)
                    return 1
            stopped_on_request = True
        finally:
            holder.close()
            for child, _ in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
            codes = [_wait_or_kill(child, time.monotonic() + stop_timeout) for child, _ in children]
        if any(codes):
            print(f"tandem serve: server processes exited with {codes}", file=sys.stderr, flush=True)
        return 0 if stopped_on_request and not any(codes) else 1


def _wait_or_kill(child: subprocess.Popen, deadline: float) -> int:
    """The child's exit code once it exits, or, past ``deadline``, after SIGKILL."""
    try:
        return child.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        print(f"tandem serve: process {child.pid} did not stop in time; killing it", file=sys.stderr, flush=True)
        child.kill()
        child.wait()
        return 1


def spawn_server(
    root: str | Path,
    port_file: str | Path,
    *serve_args: str,
    settings: tuple[str, ...] = (),
    token: str | None = None,
    stderr=None,
    timeout: float = 120.0,
) -> tuple[subprocess.Popen, int]:
    """Start ``tandem serve`` on the bundle root ``root`` at a free port, as a child
    process, and wait until it serves: ``(process, port)``. ``serve_args`` are more
    ``serve`` flags, ``settings`` ``--set`` overrides, ``token`` the child's
    ``TANDEM_TOKEN`` (None: no authentication). The caller stops the process. A child
    that exits, or does not serve within ``timeout`` seconds, raises :class:`ServeError`
    (with what it wrote to ``stderr`` when that is a pipe)."""
    env = {key: value for key, value in os.environ.items() if key != "TANDEM_TOKEN"}
    if token is not None:
        env["TANDEM_TOKEN"] = token
    overrides = [word for setting in settings for word in ("--set", setting)]
    command = [sys.executable, "-m", "engine.cli", *overrides, "serve", "--bundle", str(root), "--port", "0"]
    process = subprocess.Popen(
        [*command, "--port-file", str(port_file), *serve_args], env=env, stderr=stderr, text=True
    )
    deadline = time.monotonic() + timeout
    port_file = Path(port_file)
    while not (port_file.exists() and port_file.read_text().strip()):
        if process.poll() is not None:
            said = process.stderr.read() if process.stderr else ""
            raise ServeError(f"tandem serve exited with code {process.returncode}: {said[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise ServeError(f"tandem serve did not start within {timeout:g} s")
        time.sleep(0.05)
    return process, int(port_file.read_text())
