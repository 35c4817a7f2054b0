"""Alert email through a real SMTP server on loopback (aiosmtpd): the message's parts and
content, STARTTLS with a trustme certificate and AUTH, refusing credentials in plaintext,
the password never shown, header injection, the outbox across an SMTP outage, and the
mail-file / stdout fallbacks."""

from __future__ import annotations

import io
import logging
import mailbox

import pytest
from support.alerts import (
    T0,
    TEST_DETECTORS,
    Clock,
    add_steps,
    free_port,
    new_run,
    rules,
    smtp_server,
)

from monitor.alerts import AlertEngine, AlertSettings, NotifyError
from monitor.alerts.notify import senders_for
from monitor.alerts.notify_email import build_email, send_smtp
from monitor.alerts.render import CHART_CID
from monitor.errors import ConfigError
from monitor.store import alerts as store
from monitor.store.database import Database
from monitor.store.drilldown import write_samples

PASSWORD = "s3cr3t-hunter2-pw"


def mail_engine(db: Database, env: dict[str, str], clock: Clock, **kw) -> AlertEngine:
    settings = AlertSettings.from_env(env)
    return AlertEngine(
        db,
        rules(),
        settings=settings,
        clock=clock,
        senders=senders_for(settings, **kw),
        detectors=TEST_DETECTORS,
    )


def drifting_run(db: Database, name: str = "ppo-beta0.05") -> int:
    run = new_run(db, name)
    add_steps(db, run, 0, [0.3, 0.35, 0.4, 1.5, 1.8, 2.4], kl_p05=0.1, kl_p95=3.0)
    write_samples(
        db,
        run,
        [
            {
                "step": 5,
                "seq_index": 3,
                "kind": "top",
                "kl_seq": 2.4,
                "reward": 0.9,
                "prompt": "Say hello <b>politely</b>",
                "response": "Good day & welcome",
                "tokens": ["Good", " day", " &", " welcome"],
                "policy_logprobs": [-0.8, -0.4, -1.0, -2.0],
                "ref_logprobs": [-1.5, -2.1, -1.0, -2.0],
            },
            {
                "step": 5,
                "seq_index": 7,
                "kind": "random",
                "kl_seq": 0.1,
                "prompt": "p",
                "response": "r",
                "tokens": ["r"],
                "policy_logprobs": [-1.0],
                "ref_logprobs": [-1.1],
            },
        ],
    )
    return run


def test_alert_email_has_text_html_chart_samples_causes_and_link(sqlite_db) -> None:
    with smtp_server() as smtp:
        env = smtp.settings_env(KLMON_DASHBOARD_URL="https://klmon.example.com/")
        run = drifting_run(sqlite_db)
        report = mail_engine(sqlite_db, env, Clock()).run_once()
        assert report.sent == 1, report.as_dict()
        assert smtp.wait(1)
    got = smtp.messages[0]
    assert got.mail_from == "klmon@example.com" and got.rcpt_tos == ["oncall@example.com"]
    msg = got.message
    assert msg["Subject"] == "[klmon] CRITICAL: high-kl on proj/ppo-beta0.05"
    assert msg["To"] == "oncall@example.com"
    assert msg["Message-ID"].startswith("<klmon.alert.")
    text = msg.get_body(preferencelist=("plain",)).get_content()
    html = msg.get_body(preferencelist=("html",)).get_content()
    link = f"https://klmon.example.com/run/{run}?step=5"
    for body in (text, html):
        assert "high-kl" in body and "step 5" in body
        assert "test cause" in body  # likely causes
        assert link in body
    assert "kl_mean 2.4 above 1 at step 5" in text
    assert "'Good'" in text and "+1.7" in text and "+0.7" in text  # top-KL tokens
    assert "Say hello &lt;b&gt;politely&lt;/b&gt;" in html  # sample text escaped
    assert "Good day &amp; welcome" in html
    assert "<b>politely</b>" not in html
    # the chart: an inline PNG referenced by Content-ID from the HTML
    assert f'src="cid:{CHART_CID}"' in html
    images = [p for p in msg.walk() if p.get_content_type() == "image/png"]
    assert len(images) == 1
    assert images[0]["Content-ID"] == f"<{CHART_CID}>"
    assert images[0].get_content()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resolved_notice(sqlite_db) -> None:
    with smtp_server() as smtp:
        env = smtp.settings_env()
        clock = Clock()
        run = drifting_run(sqlite_db)
        eng = mail_engine(sqlite_db, env, clock)
        eng.run_once()
        add_steps(sqlite_db, run, 6, [0.2, 0.2])
        eng.run_once()
        assert smtp.wait(2)
    second = smtp.messages[1].message
    assert second["Subject"] == "[klmon] RESOLVED: high-kl on proj/ppo-beta0.05"
    text = second.get_body(preferencelist=("plain",)).get_content()
    assert "RESOLVED [critical] high-kl (threshold) at step 7" in text


def test_starttls_with_verified_certificate_and_auth_never_shows_the_password(
    sqlite_db, tmp_path, caplog, capsys
) -> None:
    caplog.set_level(logging.DEBUG)
    with smtp_server(tls_dir=tmp_path, user="klmon", password=PASSWORD) as smtp:
        env = smtp.settings_env(KLMON_SMTP_USER="klmon", KLMON_SMTP_PASSWORD=PASSWORD)
        settings = AlertSettings.from_env(env)
        assert PASSWORD not in repr(settings) and PASSWORD not in settings.describe()
        drifting_run(sqlite_db)
        report = mail_engine(sqlite_db, env, Clock()).run_once()
        assert report.sent == 1, report.as_dict()
        assert smtp.wait(1)
    assert smtp.auth_attempts == [("klmon", PASSWORD)]
    out = capsys.readouterr()
    shown = caplog.text + out.out + out.err + str(report.as_dict())
    assert PASSWORD not in shown
    assert PASSWORD.encode() not in smtp.messages[0].data


def test_wrong_password_fails_without_showing_it(sqlite_db, tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    with smtp_server(tls_dir=tmp_path, user="klmon", password="right") as smtp:
        env = smtp.settings_env(KLMON_SMTP_USER="klmon", KLMON_SMTP_PASSWORD=PASSWORD)
        drifting_run(sqlite_db)
        report = mail_engine(sqlite_db, env, Clock()).run_once()
    assert report.failed == 1 and report.sent == 0
    error = store.list_notifications(sqlite_db)["last_error"].iloc[0]
    assert "authentication as 'klmon' failed" in error
    assert PASSWORD not in error and PASSWORD not in caplog.text


def test_unverifiable_certificate_is_refused(sqlite_db, tmp_path, caplog) -> None:
    with smtp_server(tls_dir=tmp_path, user="klmon", password=PASSWORD) as smtp:
        env = smtp.settings_env(KLMON_SMTP_USER="klmon", KLMON_SMTP_PASSWORD=PASSWORD)
        del env["KLMON_SMTP_CA_FILE"]  # system trust store: the test CA is unknown
        drifting_run(sqlite_db)
        report = mail_engine(sqlite_db, env, Clock()).run_once()
    assert report.failed == 1
    error = store.list_notifications(sqlite_db)["last_error"].iloc[0]
    assert "did not verify" in error and "KLMON_SMTP_CA_FILE" in error
    assert smtp.auth_attempts == [] and smtp.messages == []
    assert PASSWORD not in caplog.text


def test_credentials_over_plaintext_are_refused() -> None:
    env = {
        "KLMON_SMTP_HOST": "127.0.0.1",
        "KLMON_SMTP_USER": "klmon",
        "KLMON_SMTP_PASSWORD": PASSWORD,
        "KLMON_SMTP_STARTTLS": "off",
        "KLMON_ALERT_TO": "a@example.com",
    }
    with pytest.raises(ConfigError, match="plaintext") as info:
        AlertSettings.from_env(env)
    assert PASSWORD not in str(info.value)


def test_server_without_starttls_is_refused_when_starttls_is_on() -> None:
    with smtp_server() as smtp:  # plain server: no STARTTLS offered
        settings = AlertSettings.from_env(smtp.settings_env(KLMON_SMTP_STARTTLS="on"))
        n = store.Notification(1, None, "email", "s", {"text": "t"}, (), "pending", 0, T0, T0,
                               None, None)  # fmt: skip
        with pytest.raises(NotifyError, match="does not offer STARTTLS"):
            send_smtp(build_email(n, settings), settings.smtp, settings.mail_from, ["a@b.c"])
    assert smtp.messages == []


def test_header_injection_through_a_run_name_is_neutralised(sqlite_db) -> None:
    with smtp_server() as smtp:
        drifting_run(sqlite_db, "x\r\nBcc: evil@example.com")
        report = mail_engine(sqlite_db, smtp.settings_env(), Clock()).run_once()
        assert report.sent == 1
        assert smtp.wait(1)
    got = smtp.messages[0]
    assert got.rcpt_tos == ["oncall@example.com"]
    msg = got.message
    assert msg["Bcc"] is None
    assert "\r" not in msg["Subject"] and "\n" not in msg["Subject"]
    assert b"\r\nBcc:" not in got.data.split(b"\r\n\r\n", 1)[0]
    assert msg["Subject"] == "[klmon] CRITICAL: high-kl on proj/x Bcc: evil@example.com"


def test_html_escapes_run_names_and_messages(sqlite_db) -> None:
    with smtp_server() as smtp:
        drifting_run(sqlite_db, "<script>alert(1)</script>")
        mail_engine(sqlite_db, smtp.settings_env(), Clock()).run_once()
        assert smtp.wait(1)
    html = smtp.messages[0].message.get_body(preferencelist=("html",)).get_content()
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_header_values_from_configuration_with_line_breaks_are_refused() -> None:
    with pytest.raises(ConfigError, match="KLMON_ALERT_TO"):
        AlertSettings.from_env({"KLMON_ALERT_TO": "a@example.com\r\nBcc: evil@example.com"})
    with pytest.raises(ConfigError, match="KLMON_SMTP_FROM"):
        AlertSettings.from_env({"KLMON_SMTP_FROM": "a@example.com\nBcc: evil@example.com"})


def test_outbox_delivers_once_after_an_smtp_outage(db) -> None:
    """On SQLite and PostgreSQL: the server is down, the alert waits in the outbox; the
    server comes back, the next pass after the backoff delivers it exactly once."""
    port = free_port()
    env = {
        "KLMON_SMTP_HOST": "127.0.0.1",
        "KLMON_SMTP_PORT": str(port),
        "KLMON_SMTP_STARTTLS": "off",
        "KLMON_SMTP_FROM": "klmon@example.com",
        "KLMON_ALERT_TO": "oncall@example.com",
        "KLMON_SMTP_TIMEOUT": "2",
    }
    clock = Clock()
    eng = mail_engine(db, env, clock)
    drifting_run(db)
    report = eng.run_once()
    assert report.failed == 1 and report.pending == 1
    assert "ConnectionRefusedError" in store.list_notifications(db)["last_error"].iloc[0]
    with smtp_server(port=port) as smtp:
        eng.run_once()  # backoff: not due yet
        assert smtp.messages == []
        clock.advance(10)
        report = eng.run_once()
        assert report.sent == 1
        assert smtp.wait(1)
        clock.advance(3600)
        eng.run_once()
        mail_engine(db, env, clock).run_once()  # a restarted engine: nothing more
    assert len(smtp.messages) == 1
    assert store.outbox_counts(db) == {"sent": 1}


def test_without_smtp_mail_goes_to_an_mbox_file(sqlite_db, tmp_path) -> None:
    path = tmp_path / "alerts.mbox"
    drifting_run(sqlite_db)
    report = mail_engine(sqlite_db, {"KLMON_MAIL_FILE": str(path)}, Clock()).run_once()
    assert report.sent == 1
    box = mailbox.mbox(str(path))
    (msg,) = list(box)
    assert msg["Subject"] == "[klmon] CRITICAL: high-kl on proj/ppo-beta0.05"
    assert msg.is_multipart()


def test_without_smtp_mail_goes_to_a_directory_of_eml_files(sqlite_db, tmp_path) -> None:
    folder = tmp_path / "mail"
    drifting_run(sqlite_db)
    mail_engine(sqlite_db, {"KLMON_MAIL_FILE": f"{folder}/"}, Clock()).run_once()
    (eml,) = list(folder.glob("*.eml"))
    assert b"Subject: [klmon] CRITICAL: high-kl" in eml.read_bytes()


def test_without_smtp_or_file_mail_is_printed(sqlite_db) -> None:
    out = io.StringIO()
    drifting_run(sqlite_db)
    mail_engine(sqlite_db, {}, Clock(), stdout=out).run_once()
    printed = out.getvalue()
    assert "Subject: [klmon] CRITICAL: high-kl on proj/ppo-beta0.05" in printed
    assert "kl_mean 2.4 above 1 at step 5" in printed
    assert "<html" not in printed.lower()
