"""Is the tracking server there? One ``GET /health`` with urllib, so that a job (or Snakemake,
before its first job) stops in one line when an ``http(s)://`` tracking server is unreachable,
without importing MLflow and before any compute; a server that is only restarting is waited for.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit, urlunsplit

from shrinkflow.errors import ShrinkflowError
from shrinkflow.tracking.uri import tracking_uri

# A tracking server the jobs of a run must reach (``http(s)://`` URIs only).
SERVER_WAIT_ENV = "SHRINKFLOW_TRACKING_WAIT_S"
SERVER_WAIT_S = 30.0  # a restarting server answers again within seconds; one that is not there
#                       fails a job within this, before the job writes or computes anything
START_WAIT_S = 5.0  # Snakemake's check before any job: a user is waiting at the terminal
HEALTH_TIMEOUT_S = 5.0  # one GET /health; a live server answers in milliseconds


def shown_uri(uri: str) -> str:
    """``uri`` without user name and password, for messages."""
    parts = urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=host)).rstrip("/")


def _ssl_context() -> ssl.SSLContext:
    """Verify TLS as MLflow's client does: its CA bundle, or not at all when told so."""
    context = ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"))
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("true", "1"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def server_problem(uri: str, timeout: float = HEALTH_TIMEOUT_S) -> str | None:
    """Why the tracking server at the http(s) ``uri`` is not serving, in a few words
    ("connection refused"), or None when its ``/health`` answers 200."""
    url = f"{shown_uri(uri)}/health"
    context = _ssl_context() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            return None if response.status == 200 else f"/health answered HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"/health answered HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, ConnectionRefusedError):
            return "connection refused"
        if isinstance(reason, socket.gaierror):
            return f"unknown host {urlsplit(uri).hostname!r}"
        if isinstance(reason, TimeoutError):
            return f"no answer within {timeout:g} s"
        return str(getattr(reason, "strerror", None) or reason)


def _wait_setting() -> float:
    raw = os.environ.get(SERVER_WAIT_ENV)
    if raw is None:
        return SERVER_WAIT_S
    try:
        wait = float(raw)
    except ValueError:
        wait = -1.0
    if not 0 <= wait < float("inf"):
        raise ShrinkflowError(f"{SERVER_WAIT_ENV}: {raw!r} is not a number of seconds >= 0")
    return wait


def require_server(cfg: dict, wait_s: float | None = None) -> None:
    """Return once an http(s) tracking server answers; other stores need no server.

    Args:
        wait_s: how long to keep asking (``$SHRINKFLOW_TRACKING_WAIT_S``, else ``SERVER_WAIT_S``),
            so a server that is restarting does not fail the job and one that is not there does.

    Raises:
        ShrinkflowError: one line naming the server and why it is unreachable.
    """
    uri = tracking_uri(cfg)
    if not uri.startswith(("http://", "https://")):
        return
    wait = _wait_setting() if wait_s is None else wait_s
    deadline = time.monotonic() + wait
    while True:
        problem = server_problem(uri)
        if problem is None:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(1.0, left))
    waited = f" for {wait:g} s" if wait >= 1 else ""
    raise ShrinkflowError(
        f"MLflow tracking server {shown_uri(uri)} is unreachable ({problem}{waited}); start it "
        "with `make mlflow-server` or set tracking.uri (or MLFLOW_TRACKING_URI)"
    )
