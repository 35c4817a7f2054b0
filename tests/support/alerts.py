"""Helpers for the alert tests: an injected clock, a recording sender, a threshold detector,
real loopback SMTP (aiosmtpd, optionally STARTTLS + AUTH with a trustme CA) and HTTP servers.

Imported by the test_alerts_* modules (``from support.alerts import ...``).
"""

from __future__ import annotations

import email
import email.policy
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pandas as pd

from monitor.alerts import AlertEngine, AlertSettings, parse_rules
from monitor.alerts.rules import RuleSet
from monitor.analytics import DETECTORS, Finding
from monitor.store.alerts import Notification
from monitor.store.database import Database
from monitor.store.runs import get_or_create_run
from monitor.store.steps import write_steps

#: One critical rule that fires on the first step whose KL exceeds 1 (no smoothing): the
#: latency and delivery tests and benchmarks time from such a step to its notification.
INSTANT_BUDGET_RULE = """
[[rule]]
name = "kl-over-budget"
detector = "budget"
severity = "critical"
for = 1
[rule.params]
value = 1.0
halflife_rows = 0.0
"""

T0 = 1_800_000_000.0


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ListSender:
    """Records what it is asked to send; fails while ``fail`` is set."""

    def __init__(self, channel: str = "email") -> None:
        self.channel = channel
        self.sent: list[Notification] = []
        self.fail = False

    def describe(self) -> str:
        return f"list {self.channel}"

    def send(self, notification: Notification) -> None:
        from monitor.alerts import NotifyError

        if self.fail:
            raise NotifyError("test channel is down")
        self.sent.append(notification)


def threshold(df: pd.DataFrame, ctx: Any = None, *, level: float = 1.0) -> list[Finding]:
    """Test detector: every step with kl_mean above ``level``."""
    out = []
    for step, value in zip(df["step"], df["kl_mean"], strict=True):
        if value == value and value > level:
            out.append(
                Finding(
                    detector="threshold",
                    step=int(step),
                    value=float(value),
                    threshold=level,
                    message=f"kl_mean {value:.3g} above {level:g} at step {int(step)}",
                    causes=("test cause",),
                )
            )
    return out


def boom(df: pd.DataFrame, ctx: Any = None) -> list[Finding]:
    raise RuntimeError("detector bug")


TEST_DETECTORS = {**DETECTORS, "threshold": threshold, "boom": boom}

RULES = """
[[rule]]
name = "high-kl"
detector = "threshold"
severity = "critical"
for = 3
keep_firing_for = 2
[rule.params]
level = 1.0
"""


def rules(text: str = RULES) -> RuleSet:
    return parse_rules(text, source="test rules", detectors=TEST_DETECTORS)


def engine(
    db: Database,
    clock: Clock,
    sender: ListSender | None = None,
    text: str = RULES,
    **settings: Any,
) -> AlertEngine:
    settings.setdefault("nodata_after", 3600.0)
    return AlertEngine(
        db,
        rules(text),
        settings=AlertSettings(**settings),
        clock=clock,
        senders={"email": sender or ListSender()},
        detectors=TEST_DETECTORS,
    )


def new_run(db: Database, name: str = "ppo", project: str = "proj", **kw: Any) -> int:
    kw.setdefault("now", T0)
    return get_or_create_run(db, project, name, **kw).id


def add_steps(db: Database, run_id: int, start: int, values: list[float], **cols: Any) -> None:
    """Steps start, start+1, ... with kl_mean = values (wall time 10 s apart)."""
    rows = []
    for i, v in enumerate(values):
        row = {"step": start + i, "wall_time": T0 + 10.0 * (start + i), "kl_mean": v}
        row.update({k: (c[i] if isinstance(c, list) else c) for k, c in cols.items()})
        rows.append(row)
    write_steps(db, run_id, rows)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- SMTP


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes

    @property
    def message(self) -> email.message.EmailMessage:
        return email.message_from_bytes(self.data, policy=email.policy.default)  # type: ignore[return-value]


@dataclass
class SmtpServer:
    host: str
    port: int
    messages: list[Received] = field(default_factory=list)
    auth_attempts: list[tuple[str, str]] = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)
    ca_file: str | None = None
    controller: Any = None

    def wait(self, count: int = 1, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.arrived.wait(min(left, 0.05))
            self.arrived.clear()
        return True

    def settings_env(self, **extra: str) -> dict[str, str]:
        env = {
            "KLMON_SMTP_HOST": self.host,
            "KLMON_SMTP_PORT": str(self.port),
            "KLMON_SMTP_FROM": "klmon@example.com",
            "KLMON_ALERT_TO": "oncall@example.com",
            "KLMON_SMTP_STARTTLS": "on" if self.ca_file else "off",
        }
        if self.ca_file:
            env["KLMON_SMTP_CA_FILE"] = self.ca_file
        env.update(extra)
        return env


@contextmanager
def smtp_server(
    *,
    tls_dir: Any = None,
    user: str | None = None,
    password: str | None = None,
    port: int | None = None,
) -> Iterator[SmtpServer]:
    """aiosmtpd on 127.0.0.1; with ``tls_dir``: STARTTLS (trustme certificate, CA written
    there) required, and AUTH (``user``/``password``) offered only after STARTTLS."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    server = SmtpServer("127.0.0.1", port or free_port())

    class Handler:
        async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:
            server.messages.append(
                Received(envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.content))
            )
            server.arrived.set()
            return "250 Message accepted"

    def authenticator(_server, _session, _envelope, _mechanism, auth_data):  # type: ignore[no-untyped-def]
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode()
        secret = auth_data.password.decode()
        server.auth_attempts.append((login, secret))
        return AuthResult(success=(login == user and secret == password), handled=False)

    kwargs: dict[str, Any] = {}
    if tls_dir is not None:
        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        ca_path = tls_dir / "smtp-ca.pem"
        ca.cert_pem.write_to_path(str(ca_path))
        server.ca_file = str(ca_path)
        kwargs.update(tls_context=ctx, require_starttls=True)
    if user is not None:
        kwargs.update(authenticator=authenticator, auth_require_tls=True)
    controller = Controller(
        Handler(), hostname=server.host, port=server.port, ready_timeout=10, **kwargs
    )
    controller.start()
    server.controller = controller
    try:
        yield server
    finally:
        controller.stop()


# ----------------------------------------------------------------------------- HTTP


@dataclass
class HookServer:
    url: str
    bodies: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0
    fail_first: int = 0
    fail_status: int = 503


@contextmanager
def hook_server(fail_first: int = 0, fail_status: int = 503) -> Iterator[HookServer]:
    """http.server on 127.0.0.1 in a thread; answers ``fail_status`` to the first
    ``fail_first`` POSTs, then 200."""
    state = HookServer("", fail_first=fail_first, fail_status=fail_status)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            raw = self.rfile.read(length)
            state.requests += 1
            if state.requests <= state.fail_first:
                self.send_response(state.fail_status)
                self.end_headers()
                return
            state.bodies.append(json.loads(raw))
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/hooks/secret-token"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
