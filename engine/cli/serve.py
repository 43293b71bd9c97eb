"""``tandem serve``: the gRPC service, alone or as a group of processes on one port."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.cli.common import engine_config
from engine.errors import ConfigError


def cmd_serve(args: argparse.Namespace, config: dict) -> int:

    from engine.service.server import ServerConfig, TandemServer, configure_logging

    cfg = dict(config["server"])
    for key in (
        "host",
        "port",
        "processes",
        "workers",
        "metrics_port",
        "http_port",
        "tls_cert",
        "tls_key",
        "token_all",
    ):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    processes = int(cfg["processes"])
    if processes < 1:
        raise ConfigError(f"server.processes must be at least 1, got {processes}")
    root = Path(args.bundle or config["paths"]["bundles"])
    cfg["metrics_port"], cfg["http_port"] = _optional_port(cfg["metrics_port"]), _optional_port(cfg["http_port"])
    if processes > 1:
        return _serve_processes(args, cfg, processes, root)
    cfg["token"] = _token(args)
    cfg["reuse_port"] = bool(args.reuse_port)
    cfg["tls_cert"], cfg["tls_key"] = cfg["tls_cert"] or None, cfg["tls_key"] or None
    try:
        server_config = ServerConfig(**cfg)
    except TypeError as e:
        raise ConfigError(f"[server]: {e}") from None
    configure_logging(args.log_level)
    server = TandemServer(root, server_config, engine_config(config)).start()
    if args.port_file:
        Path(args.port_file).write_text(f"{server.port}\n")
    print(
        f"serving {server.holder.engine.version} on {server_config.host}:{server.port}"
        + (f", metrics on :{server.metrics_port}/metrics" if server.metrics_port else "")
        + (f"; HTTP/JSON and the web page at {server.http.url}" if server.http else ""),
        file=sys.stderr,
        flush=True,
    )
    server.serve_until_signal()
    return 0


def _serve_processes(args: argparse.Namespace, cfg: dict, processes: int, root: Path) -> int:
    """``tandem serve --processes N``: N single-process servers on one port (see
    :mod:`engine.service.processes`), each started with this command's settings."""
    import os

    from engine.service.processes import serve_processes
    from engine.service.server import SHUTDOWN_MARGIN

    command = [sys.executable, "-m", "engine.cli"]
    command += ["--config", args.config] if args.config else []
    for override in args.overrides:
        command += ["--set", override]
    command += [
        "serve",
        "--processes",
        "1",
        "--bundle",
        str(root),
        "--host",
        str(cfg["host"]),
        "--workers",
        str(cfg["workers"]),
        "--log-level",
        args.log_level,
    ]
    command += ["--tls-cert", cfg["tls_cert"], "--tls-key", cfg["tls_key"]] if cfg["tls_cert"] else []
    command += ["--token-all"] if cfg["token_all"] else []
    if cfg["http_port"] == 0:
        raise ConfigError("--http-port 0 picks a port per process: give a fixed HTTP port with --processes")
    if cfg["http_port"] is not None:
        command += ["--http-port", str(cfg["http_port"])]  # shared by the group's processes, as the gRPC port
    token = _token(args)
    if token:  # passed on in the environment, not on a command line others can read
        os.environ["TANDEM_TOKEN"] = token
    command += ["--reuse-port"]  # the group's processes, and only they, share the port
    metrics_port = cfg["metrics_port"]
    # Each process has server.grace seconds for its in-flight requests, and its own
    # watchdog a little beyond; the supervisor kills only what outlives both.
    return serve_processes(
        processes,
        command,
        str(cfg["host"]),
        int(cfg["port"]),
        metrics_port,
        args.port_file,
        stop_timeout=float(cfg["grace"]) + 2 * SHUTDOWN_MARGIN,
    )


def _optional_port(value) -> int | None:
    """A port setting: ``None`` (or a negative number, as ``-1`` in tandem.toml) is off, ``0``
    any free port."""
    return None if value is None or int(value) < 0 else int(value)


def _token(args: argparse.Namespace) -> str | None:
    """The bearer token from --token-file, --token or $TANDEM_TOKEN (in that order), or
    None. A token that is set but empty is refused: it would silently turn auth off."""
    import os

    if args.token_file:
        try:
            token, origin = Path(args.token_file).read_text(encoding="utf-8").strip(), args.token_file
        except OSError as e:
            raise ConfigError(f"--token-file {args.token_file}: {e.strerror}") from None
    elif args.token is not None:
        token, origin = args.token, "--token"
    elif "TANDEM_TOKEN" in os.environ:
        token, origin = os.environ["TANDEM_TOKEN"], "TANDEM_TOKEN"
    else:
        return None
    if not token.strip():
        raise ConfigError(
            f"{origin} is set but empty: refusing to serve without authentication by accident "
            "(unset it to serve without a token)"
        )
    return token


def register(commands) -> None:
    """Add this group's commands to the ``tandem`` parser."""
    serve = commands.add_parser(
        "serve",
        help="serve the published bundle over gRPC, and HTTP/JSON with a web page (--http-port)",
        description="Serve <paths.bundles> over gRPC until SIGTERM/SIGINT. The bearer token comes from "
        "--token-file, --token or the TANDEM_TOKEN environment variable; when set it is required on "
        "the Admin service and on AddItems (and on every rpc with --token-all). An empty token is "
        "refused. Prefer --token-file or TANDEM_TOKEN: a --token is visible to every local user in "
        "the process list.",
    )
    serve.add_argument("--bundle", metavar="ROOT", help="bundle root holding current (default: paths.bundles)")
    serve.add_argument("--host", help="address to bind (default: server.host)")
    serve.add_argument("--port", type=int, help="port (default: server.port; 0 = any free port)")
    serve.add_argument(
        "--token",
        help="bearer token (default: $TANDEM_TOKEN; none = no authentication); "
        "visible to other local users in the process list: prefer --token-file",
    )
    serve.add_argument("--token-file", metavar="PATH", help="read the bearer token from this file (one line)")
    serve.add_argument("--token-all", action="store_true", default=None, help="require the token on every rpc")
    serve.add_argument("--tls-cert", metavar="PEM", help="server certificate chain (TLS with --tls-key)")
    serve.add_argument("--tls-key", metavar="PEM", help="server private key")
    serve.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (-1 = off, 0 = any free port)")
    serve.add_argument(
        "--http-port",
        type=int,
        help="also serve the HTTP/JSON API and the web page on this port (-1 = off, 0 = any free port; "
        "default: server.http_port)",
    )
    serve.add_argument(
        "--processes",
        type=int,
        help="server processes sharing the port through SO_REUSEPORT, about one per core (default: server.processes)",
    )
    serve.add_argument("--workers", type=int, help="request threads per process (default: server.workers)")
    serve.add_argument("--port-file", metavar="PATH", help="write the bound port there once serving (for scripts)")
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # set by --processes for its group
    serve.add_argument("--log-level", default="INFO", help="INFO (default) or DEBUG (a JSON line per request)")
    serve.set_defaults(handler=cmd_serve)
