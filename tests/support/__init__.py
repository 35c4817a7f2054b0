"""Helpers the tests import (``from support.alerts import Clock``); no tests live here.

- ``alerts``: an injected clock, a recording sender, test detectors, loopback SMTP and HTTP
  servers for the alert tests;
- ``db``: a migrated SQLite file (the ``sqlite_url`` fixture of ``tests/conftest.py``);
- ``pg_cluster``: a private PostgreSQL cluster a test may stop and start;
- ``realdata_path`` and ``realdata_alerts``: where the real training logs are, and what the
  alert tests expect of each;
- ``trl_tiny``: a tiny TRL trainer that trains on CPU in seconds.
"""
