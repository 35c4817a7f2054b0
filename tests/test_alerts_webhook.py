"""Webhook notifications against a real HTTP server on loopback: Slack-compatible JSON,
retry with backoff on 5xx, the outbox when every retry fails, only http(s) URLs, no
redirects, the URL's secret path never logged."""

from __future__ import annotations

import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread

import pytest
from support.alerts import (
    TEST_DETECTORS,
    Clock,
    ListSender,
    add_steps,
    hook_server,
    new_run,
    rules,
)

from monitor.alerts import AlertEngine, AlertSettings, NotifyError
from monitor.alerts.notify_webhook import WebhookSender
from monitor.errors import ConfigError
from monitor.store import alerts as store
from monitor.store.database import Database


def hook_engine(db: Database, url: str, clock: Clock, delays: list[float]) -> AlertEngine:
    settings = AlertSettings.from_env(
        {"KLMON_WEBHOOK_URL": url, "KLMON_DASHBOARD_URL": "http://dash.example"}
    )
    return AlertEngine(
        db,
        rules(),
        settings=settings,
        clock=clock,
        senders={
            "email": ListSender(),
            "webhook": WebhookSender(settings, sleep=delays.append),
        },
        detectors=TEST_DETECTORS,
    )


def test_webhook_posts_slack_compatible_json_after_retrying_5xx(sqlite_db, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    delays: list[float] = []
    with hook_server(fail_first=2) as hook:
        run = new_run(sqlite_db, "ppo<&>")
        add_steps(sqlite_db, run, 0, [2.0, 2.5, 3.0])
        report = hook_engine(sqlite_db, hook.url, Clock(), delays).run_once()
    assert report.sent == 2  # email + webhook
    assert hook.requests == 3 and delays == [0.5, 1.0]  # exponential backoff
    (body,) = hook.bodies
    assert body["text"].startswith("*klmon* run `proj/ppo&lt;&amp;&gt;`")
    assert "FIRING *critical* `high-kl` at step 2" in body["text"]
    assert body["run"] == {"id": run, "project": "proj", "name": "ppo<&>"}
    assert body["severity"] == "critical"
    assert body["url"] == f"http://dash.example/run/{run}?step=2"
    (fired,) = body["fired"]
    assert (fired["rule"], fired["fired_step"], fired["value"], fired["threshold"]) == (
        "high-kl",
        2,
        3.0,
        1.0,
    )
    assert fired["causes"] == ["test cause"] and body["resolved"] == []
    assert body["event_ids"] == [fired["event_id"]]
    assert "secret-token" not in caplog.text


def test_webhook_down_for_every_retry_is_retried_by_the_outbox_and_sent_once(db) -> None:
    delays: list[float] = []
    clock = Clock()
    with hook_server(fail_first=3) as hook:
        eng = hook_engine(db, hook.url, clock, delays)
        run = new_run(db)
        add_steps(db, run, 0, [2.0] * 3)
        report = eng.run_once()
        assert report.failed == 1 and hook.bodies == []
        errors = store.list_notifications(db, status="pending")["last_error"].tolist()
        (error,) = errors
        assert error.endswith("/…: HTTP 503 Service Unavailable (after 3 attempts)")
        assert "secret-token" not in error
        clock.advance(10)
        eng.run_once()
        clock.advance(1000)
        eng.run_once()
    assert len(hook.bodies) == 1 and hook.requests == 4


def test_client_errors_are_not_retried_within_a_send(sqlite_db) -> None:
    delays: list[float] = []
    with hook_server(fail_first=5, fail_status=404) as hook:
        settings = AlertSettings.from_env({"KLMON_WEBHOOK_URL": hook.url})
        n = store.Notification(1, 1, "webhook", "s", {"text": "t"}, (1,), "pending", 0, 0.0,
                               0.0, None, None)  # fmt: skip
        with pytest.raises(NotifyError, match="HTTP 404") as info:
            WebhookSender(settings, sleep=delays.append).send(n)
    assert info.value.transient is False and hook.requests == 1 and delays == []


def test_redirects_are_not_followed() -> None:
    hits: list[str] = []

    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            hits.append(self.path)
            self.send_response(307)
            self.send_header("Location", "http://127.0.0.1:9/elsewhere")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/hook"
        settings = AlertSettings.from_env({"KLMON_WEBHOOK_URL": url})
        n = store.Notification(1, 1, "webhook", "s", {}, (), "pending", 0, 0.0, 0.0, None, None)
        with pytest.raises(NotifyError, match="HTTP 307"):
            WebhookSender(settings, sleep=lambda s: None).send(n)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert hits == ["/hook"]


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "ftp://example.com/x", "gopher://example.com", "/tmp/hook", "http://"],
)
def test_only_http_urls_from_configuration(url: str) -> None:
    with pytest.raises(ConfigError, match="KLMON_WEBHOOK_URL must be an http"):
        AlertSettings.from_env({"KLMON_WEBHOOK_URL": url})


def test_settings_never_show_the_webhook_path() -> None:
    settings = AlertSettings.from_env({"KLMON_WEBHOOK_URL": "https://hooks.example/T0/B1/xyz"})
    assert "xyz" not in repr(settings) and "xyz" not in settings.describe()
    assert "https://hooks.example/…" in settings.describe()
