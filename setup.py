"""Alembic's migrations live at the top level (``migrations/``) and ship inside the wheel as
``monitor.migrations``, so a non-editable install can still run ``klmon db upgrade``.
pyproject.toml cannot map a folder outside the package while also discovering packages.

``monitor._kernel`` is the fused token pass of ``monitor.divergence`` in C. It is optional:
where no C compiler is found the install goes on and ``monitor.divergence`` uses its numpy
kernel (same results, a few times slower)."""

from setuptools import Extension, find_packages, setup

setup(
    packages=[*find_packages(include=["monitor", "monitor.*"]), "monitor.migrations",
              "monitor.migrations.versions"],
    package_dir={"monitor.migrations": "migrations"},
    ext_modules=[
        Extension("monitor._kernel", ["monitor/_kernel.c"], optional=True,
                  extra_compile_args=["-O3", "-fno-math-errno"]),
    ],
)
