"""The Docker image's steps, without Docker: build the wheel from exactly what
docker/Dockerfile copies, check it ships the migrations, the alembic env and the default
alert rules, install it into a fresh virtualenv and run the commands the image and
docker/compose.yaml run.

The fresh venv gets the wheel with ``--no-deps``; its dependencies come from this test's
own environment through a ``.pth`` line naming this interpreter's site-packages. A path
line in a .pth file is only appended to sys.path: the .pth files *inside* that directory
(an editable install's finder, ``__editable__.klmon-*.pth``) are not processed, so
``import monitor`` in the fresh venv finds the wheel's copy and never the checkout; the test
asserts that. Installing every dependency from the index would take minutes and need the
network; this way the wheel's own content is what is tested, in a few seconds.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.db", "*.db-wal", "*.db-shm")
ENV_DEFAULT = re.compile(r"\$\{([A-Z0-9_]+)(?::?-([^}]*))?\}")


def _run(
    cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None, timeout=300
) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    assert proc.returncode == 0, (
        f"{shlex.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


def _build_stage_copies() -> list[tuple[list[str], str]]:
    """The ``COPY src... dest`` lines of the Dockerfile's first (build) stage."""
    copies = []
    for line in DOCKERFILE.read_text().splitlines():
        line = line.strip()
        if line.startswith("FROM") and copies:
            break
        if line.startswith("COPY ") and "--from" not in line:
            *srcs, dest = line.split()[1:]
            copies.append((srcs, dest))
    return copies


def _dockerfile_json(instruction: str) -> list[str]:
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith(instruction + " ["):
            return json.loads(line[len(instruction) :].strip())
    raise AssertionError(f"no {instruction} [...] line in {DOCKERFILE}")


class Image:
    """The installed wheel: its venv, bin directory and an environment to run it in."""

    def __init__(self, root: Path, wheel: Path, venv: Path) -> None:
        self.root = root
        self.wheel = wheel
        self.venv = venv
        self.bin = venv / "bin"
        self.db_url = f"sqlite:///{root / 'image.db'}"
        self.env = {
            "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": str(root),
            "KLMON_DB_URL": self.db_url,
            "PYTHONDONTWRITEBYTECODE": "1",
        }

    def klmon(self, *args: str, env: dict[str, str] | None = None) -> str:
        cmd = [str(self.bin / "klmon"), *args]
        return _run(cmd, env={**self.env, **(env or {})}, cwd=self.root)

    def python(self, code: str, env: dict[str, str] | None = None) -> str:
        # from the image's home (WORKDIR), never the checkout: "" on sys.path is the cwd
        cmd = [str(self.bin / "python"), "-c", code]
        return _run(cmd, env={**self.env, **(env or {})}, cwd=self.root)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    root = tmp_path_factory.mktemp("image")
    # 1. the build context, as the Dockerfile copies it (never build in the checkout)
    src = root / "src"
    src.mkdir()
    for sources, dest in _build_stage_copies():
        for s in sources:
            target = src / dest if not dest.endswith("/") and len(sources) == 1 else src / dest / s
            path = ROOT / s
            if path.is_dir():
                shutil.copytree(path, target, ignore=IGNORED)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
    # 2. the wheel: RUN pip wheel --no-deps -w /wheels .
    wheels = root / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(src)])
    (wheel,) = wheels.glob("klmon-*.whl")
    # 3. a fresh venv with the wheel; dependencies from this environment (module doc)
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    fresh_python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(fresh_python), "install", "-q",
          "--no-deps", str(wheel)])  # fmt: skip
    site = Path(
        _run(
            [str(fresh_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
        ).strip()
    )
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "zz_klmon_test_deps.pth").write_text("\n".join(ours) + "\n")
    return Image(root, wheel, venv)


def test_wheel_ships_migrations_env_and_default_rules(image: Image) -> None:
    names = set(zipfile.ZipFile(image.wheel).namelist())
    migrations = sorted(p.name for p in (ROOT / "migrations" / "versions").glob("[0-9]*.py"))
    assert migrations, "no migrations in the checkout?"
    for name in migrations:
        assert f"monitor/migrations/versions/{name}" in names
    for name in (
        "monitor/migrations/env.py",
        "monitor/migrations/script.py.mako",
        "monitor/alerts/default_rules.toml",
    ):
        assert name in names, f"{name} is not in {image.wheel.name}"
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    meta = zipfile.ZipFile(image.wheel).read(metadata).decode()
    # the runtime image installs the wheel with [server]: gunicorn must come with it
    assert re.search(r"Requires-Dist: gunicorn.*extra == .server.", meta), meta


def test_wheel_ships_the_compiled_token_pass_and_sample_codec(image: Image) -> None:
    """The build stage has a C compiler (as here), so the wheel carries monitor._kernel and
    monitor._codec, and the installed package uses them rather than the numpy fallbacks."""
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler here: the wheel is built without monitor._kernel")
    names = zipfile.ZipFile(image.wheel).namelist()
    assert any(re.fullmatch(r"monitor/_kernel\..*\.so", n) for n in names), names
    assert any(re.fullmatch(r"monitor/_codec\..*\.so", n) for n in names), names
    image.python("import monitor.divergence as d; assert d.kernel() != 'numpy'")
    image.python("import monitor.store.sample_codec as c; assert c._planes is c._compiled_planes")


def test_wheel_ships_dashboard_assets(image: Image) -> None:
    names = set(zipfile.ZipFile(image.wheel).namelist())
    assets = sorted((ROOT / "monitor" / "dashboard" / "assets").glob("*.*"))
    assert assets
    missing = [p.name for p in assets if f"monitor/dashboard/assets/{p.name}" not in names]
    assert not missing, f"{missing} are not in {image.wheel.name}: the dashboard has no style"


def test_installed_wheel_not_the_checkout(image: Image) -> None:
    where = image.python("import monitor, monitor.store.schema as s; print(monitor.__file__)")
    assert Path(where).is_relative_to(image.venv), where
    assert not Path(where).is_relative_to(ROOT)


def test_entrypoint_commands_on_a_fresh_database(image: Image) -> None:
    out = image.klmon("db", "upgrade")
    assert "schema upgraded (empty) ->" in out
    assert "up to date" in image.klmon("db", "current")
    assert json.loads(image.klmon("runs", "--json")) == []
    help_text = image.klmon("alerts", "watch", "--help")
    assert "Example" in help_text and "--interval" in help_text


def _service_env(service: dict, key: str) -> dict[str, str]:
    """A compose service's environment with ``${VAR:-default}`` taken at its default."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: ENV_DEFAULT.sub(lambda m: m.group(2) or "", str(v)) for k, v in env.items()}


def _check_wsgi_target(image: Image, target: str, env: dict[str, str]) -> None:
    """``module:attr`` imports in the installed wheel, is a WSGI app with an open /healthz
    (the image's HEALTHCHECK) and, with credentials configured, guards its pages."""
    module, _, attr = target.partition(":")
    code = (
        f"import importlib; app = getattr(importlib.import_module({module!r}), {attr!r}); "
        "c = app.test_client(); h = c.get('/healthz'); p = c.get('/'); "
        "print(h.status_code, h.get_data(as_text=True).strip(), p.status_code)"
    )
    out = image.python(code, env={**env, "KLMON_DB_URL": image.db_url}).split()
    assert out[:2] == ["200", "ok"], out
    if env.get("KLMON_DASHBOARD_USER") or env.get("KLMON_DASHBOARD_TOKEN"):
        assert out[2] == "401", f"{target}: / answered {out[2]} without credentials"


def _check_command(image: Image, command: list[str], env: dict[str, str]) -> None:
    if command[0] == "klmon":
        # every subcommand and option exists: click answers --help only if they parse
        assert "Example" in image.klmon(*command[1:], "--help")
    elif command[0] == "gunicorn":
        targets = [a for a in command[1:] if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", a)]
        assert len(targets) == 1, command
        _check_wsgi_target(image, targets[0], env)
    else:
        raise AssertionError(f"unexpected image command {command}")


def test_dockerfile_cmd_and_healthcheck(image: Image) -> None:
    image.klmon("db", "upgrade")
    cmd = _dockerfile_json("CMD")
    env = {"KLMON_DASHBOARD_USER": "klmon", "KLMON_DASHBOARD_PASSWORD": "change-me-please"}
    _check_command(image, cmd, env)
    health = next(ln for ln in DOCKERFILE.read_text().splitlines() if "/healthz" in ln)
    assert "8050" in health and "8050" in " ".join(cmd)


def test_compose_services_run_real_klmon_commands(image: Image) -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read docker/compose.yaml")
    compose = yaml.safe_load(COMPOSE.read_text())
    image.klmon("db", "upgrade")
    checked = []
    for name, service in compose["services"].items():
        command = service.get("command")
        if command is None:
            assert "image" in service and "build" not in service, (
                f"service {name} builds klmon but runs no command"
            )
            continue
        if isinstance(command, str):
            command = shlex.split(command)
        env = _service_env(service, name)
        _check_command(image, [str(c) for c in command], env)
        checked.append(name)
    assert {"migrate", "dashboard", "alerts"} <= set(checked)
