"""``llmflow-hpo dashboard``: optuna-dashboard served on a study's storage.

optuna-dashboard (a dependency) shows a study's trials, learning curves and plots, and its note
(``study.note``), from the storage alone. ``open_dashboard`` serves its WSGI app on a local port; ``serve``
runs it until Ctrl-C or SIGTERM. Neither imports torch or transformers.
"""

from __future__ import annotations

import errno
import ipaddress
import signal
import socket
import socketserver
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from llmflow_hpo.errors import LlmflowError

__all__ = ["Dashboard", "open_dashboard"]


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a browser's open connection never holds up the exit

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host up in DNS (socket.getfqdn), which hangs on machines without it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])
        self.setup_environ()

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):  # the browser went away mid-answer
            return
        super().handle_error(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # no line per request on stderr
        pass


def _url_host(host: str) -> str:
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"[{shown}]" if ":" in shown else shown


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Stop(Exception):
    """SIGTERM: leave serve_forever like Ctrl-C does."""


@dataclass
class Dashboard:
    """optuna-dashboard listening on ``host:port``; ``url`` is the study's page (or the study list)."""

    server: WSGIServer
    url: str
    host: str
    port: int
    storage: str
    study: str | None

    def serve(self) -> int:
        """Answer requests until Ctrl-C or SIGTERM (or ``shutdown`` from another thread); returns 0."""
        in_main = threading.current_thread() is threading.main_thread()

        def stop(signum: int, frame: Any) -> None:
            raise _Stop

        previous = signal.signal(signal.SIGTERM, stop) if in_main else None
        try:
            self.server.serve_forever()
        except (KeyboardInterrupt, _Stop):
            pass
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            self.server.server_close()
        return 0

    def shutdown(self) -> None:
        self.server.shutdown()


def open_dashboard(
    storage: str,
    *,
    study: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    log: Callable[[str], None] | None = None,
) -> Dashboard:
    """optuna-dashboard on ``storage``, bound to ``host:port`` (0: a free port) and ready to ``serve``."""
    from llmflow_hpo.study.storage import open_storage, require_study

    rdb = open_storage(storage, existing=True)
    study_id = None
    if study is not None:
        require_study(rdb, study, storage)  # an unknown name: one line listing the studies there
        study_id = rdb.get_study_id_from_name(study)
    import optuna_dashboard

    app = optuna_dashboard.wsgi(rdb)
    server_class = _Server6 if ":" in host else _Server
    try:
        server = server_class((host, port), _QuietHandler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise LlmflowError(
                f"--port {port}: port {port} on {host} is already in use (another dashboard?); "
                "pass another --port, or --port 0 to pick a free one"
            ) from None
        if e.errno == errno.EACCES:
            raise LlmflowError(
                f"--port {port}: not allowed to listen on port {port} (ports below 1024 need root); "
                "pass --port 8080, or --port 0 to pick a free one"
            ) from None
        raise LlmflowError(
            f"--host {host}: cannot listen on this address ({e.strerror or e}); pass --host 127.0.0.1 "
            "(this machine only) or --host 0.0.0.0 (every network interface)"
        ) from None
    server.set_app(app)
    real_port = int(server.server_address[1])
    page = f"/dashboard/studies/{study_id}" if study_id is not None else "/dashboard"
    if log is not None and not _is_loopback(host):
        log(
            f"warning: optuna-dashboard has no login; anyone who reaches {host}:{real_port} can read, edit and "
            "delete the studies in this storage"
        )
    return Dashboard(
        server=server,
        url=f"http://{_url_host(host)}:{real_port}{page}",
        host=host,
        port=real_port,
        storage=storage,
        study=study,
    )
