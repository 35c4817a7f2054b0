"""Alembic's migrations live at the top level (``migrations/``) and ship inside the wheel as
``monitor.migrations``, so a non-editable install can still run ``klmon db upgrade``.
pyproject.toml cannot map a folder outside the package while also discovering packages."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["monitor", "monitor.*"]), "monitor.migrations",
              "monitor.migrations.versions"],
    package_dir={"monitor.migrations": "migrations"},
)
