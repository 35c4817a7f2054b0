"""Alembic's migrations live at the top level (``migrations/``) and ship inside the wheel as
``monitor.migrations``, so a non-editable install can still run ``klmon db upgrade``.
pyproject.toml cannot map a folder outside the package while also discovering packages.

``monitor._kernel`` is the fused token pass of ``monitor.divergence`` in C. It is optional:
where no C compiler is found the install goes on and ``monitor.divergence`` uses its numpy
kernel (same results, a few times slower). ``monitor._codec`` is the per-value work of a
drill-down sample's payload, optional the same way (``monitor.store.sample_codec`` falls back
to numpy, same bytes)."""

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    """GCC/Clang flags only where the compiler takes them (MSVC would only warn)."""

    def build_extensions(self) -> None:
        if self.compiler.compiler_type != "msvc":
            for ext in self.extensions:
                ext.extra_compile_args = ["-O3", "-fno-math-errno"]
        super().build_extensions()


setup(
    cmdclass={"build_ext": BuildExt},
    packages=[
        *find_packages(include=["monitor", "monitor.*"]),
        "monitor.migrations",
        "monitor.migrations.versions",
    ],
    package_dir={"monitor.migrations": "migrations"},
    ext_modules=[
        Extension("monitor._kernel", ["monitor/_kernel.c"], optional=True),
        Extension("monitor._codec", ["monitor/_codec.c"], optional=True),
    ],
)
