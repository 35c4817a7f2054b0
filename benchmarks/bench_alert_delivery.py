"""Alert delivery with a stuck webhook: seconds from a second incident's drifting step
landing in the database to its alert email (and its webhook) arriving, while the webhook
receiver is stuck on the first incident's notification.

`klmon alerts watch` runs as a subprocess with its default settings on a fresh SQLite
database, an SMTP server (aiosmtpd) and a webhook receiver on loopback. Run `slow` fires
first; the receiver answers its POST promptly (baseline, measured in the same run), hangs
(reads the request, never answers), or trickles (one header byte every 0.4 s for
--trickle-s seconds). Then run `fast` fires and the clock starts.

    python benchmarks/bench_alert_delivery.py [--interval 2] [--trickle-s 60] [--tree DIR]

--tree runs the watcher from another checkout (e.g. an older commit, to compare).
Needs the test extras (aiosmtpd).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from aiosmtpd.controller import Controller

from monitor.store.database import Database
from monitor.store.runs import get_or_create_run
from monitor.store.steps import write_steps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.alerts import INSTANT_BUDGET_RULE, free_port
from support.db import migrated_sqlite

GIVE_UP_S = 240.0


class Inbox:
    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        text = bytes(envelope.content).decode("utf-8", "replace")
        for run in ("slow", "fast"):
            if f"bench/{run}" in text:
                self.arrivals.setdefault(run, time.monotonic())
        return "250 OK"


class Receiver:
    """A webhook receiver on loopback: ``mode`` applies to run `slow`'s POST."""

    def __init__(self, mode: str, trickle_s: float) -> None:
        self.mode, self.trickle_s = mode, trickle_s
        self.arrivals: dict[str, float] = {}
        self.stuck = threading.Event()
        self.stop = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/hook"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.lower().split(b"\r\n")
            length = next(
                (int(x.split(b":")[1]) for x in lines if x.startswith(b"content-length")), 0
            )
            while len(body) < length:
                body += conn.recv(65536)
            text = json.loads(body).get("text", "")
            run = "slow" if "bench/slow" in text else "fast"
            ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            if run == "slow" and self.mode != "ok":
                self.stuck.set()
                if self.mode == "hang":
                    self.stop.wait(GIVE_UP_S)
                    return
                end = time.monotonic() + self.trickle_s
                try:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                    while time.monotonic() < end and not self.stop.wait(0.4):
                        conn.sendall(b"a")
                    conn.sendall(b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                except OSError:
                    return
                return
            self.arrivals.setdefault(run, time.monotonic())
            if run == "slow":
                self.stuck.set()
            conn.sendall(ok)

    def close(self) -> None:
        self.stop.set()
        self.server.close()


def scenario(mode: str, args: argparse.Namespace, tree: Path) -> tuple[float, float]:
    """(seconds to `fast`'s email, to `fast`'s webhook); inf when it never came."""
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    receiver = Receiver(mode, args.trickle_s)
    with tempfile.TemporaryDirectory() as tmp:
        url = migrated_sqlite(Path(tmp) / "bench.db")
        rules = Path(tmp) / "rules.toml"
        rules.write_text(INSTANT_BUDGET_RULE)
        env = {
            **os.environ,
            "PYTHONPATH": str(tree),
            "KLMON_SMTP_HOST": "127.0.0.1",
            "KLMON_SMTP_PORT": str(port),
            "KLMON_SMTP_STARTTLS": "off",
            "KLMON_SMTP_FROM": "klmon@example.com",
            "KLMON_ALERT_TO": "oncall@example.com",
            "KLMON_WEBHOOK_URL": receiver.url,
            "KLMON_ALERT_RULES": str(rules),
        }
        watcher = subprocess.Popen(
            [sys.executable, "-m", "monitor", "alerts", "watch", "--db", url,
             "--interval", f"{args.interval}s"],
            cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        db = Database.open(url)
        try:
            now = time.time()
            slow = get_or_create_run(db, "bench", "slow", now=now).id
            write_steps(db, slow, [{"step": 0, "wall_time": now, "kl_mean": 3.0}])
            if not receiver.stuck.wait(60):
                raise SystemExit("the watcher never posted run slow's webhook")
            fast = get_or_create_run(db, "bench", "fast", now=time.time()).id
            t0 = time.monotonic()
            write_steps(db, fast, [{"step": 0, "wall_time": time.time(), "kl_mean": 3.0}])
            while time.monotonic() - t0 < GIVE_UP_S:
                if "fast" in inbox.arrivals and "fast" in receiver.arrivals:
                    break
                time.sleep(0.02)
            email = inbox.arrivals.get("fast", float("inf")) - t0
            hook = receiver.arrivals.get("fast", float("inf")) - t0
        finally:
            receiver.close()
            watcher.terminate()
            try:
                watcher.wait(60)
            except subprocess.TimeoutExpired:
                watcher.kill()
            db.dispose()
            controller.stop()
    return email, hook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=2.0, help="watch interval, seconds")
    parser.add_argument("--trickle-s", type=float, default=60.0)
    parser.add_argument("--tree", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--modes", default="ok,hang,trickle")
    args = parser.parse_args()
    tree = Path(args.tree).resolve()
    print(f"watcher from {tree}, interval {args.interval:g} s, trickle {args.trickle_s:g} s")
    print(f"{'webhook on the first incident':<32} {'2nd email s':>12} {'2nd webhook s':>14}")
    for mode in args.modes.split(","):
        email, hook = scenario(mode, args, tree)
        label = "answers (baseline)" if mode == "ok" else mode
        print(f"{label:<32} {email:>12.2f} {hook:>14.2f}", flush=True)


if __name__ == "__main__":
    main()
