"""ORM classes mapped onto the Core tables of ``monitor.store.tables``, for the readers that
query with them (the alert engine's state, events, silences and outbox). Each class takes its
columns from its table; the schema lives there alone.

Loading this module loads ``sqlalchemy.orm`` and maps every class: the write paths import
``monitor.store.tables`` instead (``klmon import`` and the live committer never map a class).
"""

from __future__ import annotations

from sqlalchemy.orm import DeclarativeBase

from monitor.store import tables


class Base(DeclarativeBase):
    metadata = tables.metadata


class RunRow(Base):
    __table__ = tables.runs


class AlertEventRow(Base):
    __table__ = tables.alert_events


class AlertCursorRow(Base):
    __table__ = tables.alert_cursors


class AlertStateRow(Base):
    __table__ = tables.alert_states


class AlertSilenceRow(Base):
    __table__ = tables.alert_silences


class AlertNotificationRow(Base):
    __table__ = tables.alert_notifications
