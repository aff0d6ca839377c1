"""systemd/install.sh into a temp root: the tree it creates, idempotence, config never overwritten, uninstall and
purge, a real venv with a real pip install of the edgecv wheel, and the installed unit verifying against it."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.broker import Broker
from tests.ops.test_systemd_unit import EXEC, systemd_analyze

REPO = Path(__file__).resolve().parents[2]
INSTALLER = REPO / "systemd" / "install.sh"


def install(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["bash", str(INSTALLER), "--root", str(root), *args], capture_output=True, text=True,
                         timeout=300)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def tree_digest(root: Path) -> dict[str, str]:
    """Every path under root with its type, mode and content hash (or link target); mtimes left out."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        if "__pycache__" in path.parts:
            continue
        st = path.lstat()
        rel = str(path.relative_to(root))
        if stat.S_ISLNK(st.st_mode):
            out[rel] = f"link {os.readlink(path)}"
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = f"dir {stat.S_IMODE(st.st_mode):o}"
        else:
            out[rel] = f"file {stat.S_IMODE(st.st_mode):o} {hashlib.sha256(path.read_bytes()).hexdigest()}"
    return out


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_stages_the_expected_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    out = install(root, "--skip-pip")
    assert "not creating user edgecv" in out.stderr
    etc = root / "etc/edgecv"
    assert (etc / "agent.toml").read_text() == (REPO / "systemd/agent.example.toml").read_text()
    assert mode(etc / "agent.toml") == 0o640 and mode(etc) == 0o750
    assert (etc / "mqtt-password").read_bytes() == b"" and mode(etc / "mqtt-password") == 0o600
    assert (etc / "keyring").is_dir() and mode(etc / "keyring") == 0o755
    assert (root / "var/lib/edgecv/models").is_dir() and mode(root / "var/lib/edgecv/models") == 0o750
    assert (root / "var/cache/edgecv").is_dir()
    unit = root / "etc/systemd/system/edgecv-agent.service"
    assert unit.read_text() == (REPO / "systemd/edgecv-agent.service").read_text() and mode(unit) == 0o644
    assert (root / "opt/edgecv/venv/bin/python").exists() and (root / "opt/edgecv/venv/pyvenv.cfg").is_file()
    seed = root / "opt/edgecv/seed"  # the seed location docs/INSTALL-PI.md uses, filled
    assert (seed / "fashion-mnist.edgecv").read_bytes() == (REPO / "models/fashion-mnist.edgecv").read_bytes()
    assert (seed / "demo-signing.pub").read_bytes() == (REPO / "models/demo-signing.pub").read_bytes()
    assert mode(seed / "fashion-mnist.edgecv") == 0o644


def test_second_run_changes_nothing_and_keeps_the_users_config(tmp_path: Path) -> None:
    root = tmp_path / "root"
    install(root, "--skip-pip")
    cfg = root / "etc/edgecv/agent.toml"
    cfg.write_text('device_id = "pi-mine"\n')
    (root / "etc/edgecv/mqtt-password").write_text("hunter2\n")
    before = tree_digest(root)
    out = install(root, "--skip-pip")
    assert tree_digest(root) == before
    assert "wrote" not in out.stderr and "kept existing" in out.stderr
    # An upgrade with a changed unit replaces the unit, and still not the config.
    unit = root / "etc/systemd/system/edgecv-agent.service"
    unit.write_text("stale\n")
    out = install(root, "--skip-pip")
    assert unit.read_text() == (REPO / "systemd/edgecv-agent.service").read_text()
    assert cfg.read_text() == 'device_id = "pi-mine"\n'
    assert (root / "etc/edgecv/mqtt-password").read_text() == "hunter2\n"


def test_uninstall_keeps_config_and_state_unless_purged(tmp_path: Path) -> None:
    root = tmp_path / "root"
    install(root, "--skip-pip")
    (root / "var/lib/edgecv/models/versions").mkdir()
    out = install(root, "--uninstall")
    assert not (root / "etc/systemd/system/edgecv-agent.service").exists()
    assert not (root / "opt/edgecv").exists()
    assert (root / "etc/edgecv/agent.toml").is_file() and (root / "var/lib/edgecv/models/versions").is_dir()
    assert "kept" in out.stderr
    install(root, "--uninstall", "--purge")
    assert not (root / "etc/edgecv").exists() and not (root / "var/lib/edgecv").exists()
    assert not (root / "var/cache/edgecv").exists()


def test_dry_run_changes_nothing_and_shows_the_pip_spec(tmp_path: Path) -> None:
    root = tmp_path / "root"
    out = install(root, "--dry-run", "--runtime", "litert", "--source", "edgecv==0.2.0")
    assert not root.exists()
    pip_line = next(line for line in out.stdout.splitlines() if " pip install " in line)
    assert pip_line.replace("\\", "").endswith("edgecv[litert]==0.2.0")
    assert "-m venv" in out.stdout and "agent.toml" in out.stdout


def test_dry_run_on_the_real_root_sets_owners_and_touches_nothing() -> None:
    out = subprocess.run(["bash", str(INSTALLER), "--dry-run", "--skip-pip"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "+ install -d -m 0750 -o edgecv -g edgecv /var/lib/edgecv/models" in lines
    assert "+ install -d -m 0750 -o root -g edgecv /etc/edgecv" in lines
    assert any(line.startswith("+ install -m 0640 -o root -g edgecv ") and line.endswith(" /etc/edgecv/agent.toml")
               for line in lines) or Path("/etc/edgecv/agent.toml").exists()
    if subprocess.run(["getent", "passwd", "edgecv"], capture_output=True).returncode != 0:
        assert any(line.startswith("+ useradd --system") for line in lines)
    assert not Path("/opt/edgecv").exists() or Path("/opt/edgecv/venv").exists()  # nothing half-made


def test_bad_arguments_fail_with_a_clear_message(tmp_path: Path) -> None:
    out = install(tmp_path / "r", "--runtime", "tensorflow", check=False)
    assert out.returncode != 0 and "--runtime onnxruntime, --runtime litert or --runtime openvino" in out.stderr
    out = install(tmp_path / "r", "--purge", check=False)
    assert out.returncode != 0 and "--purge only goes with --uninstall" in out.stderr
    out = install(tmp_path / "r", "--frobnicate", check=False)
    assert out.returncode != 0 and "Unknown option '--frobnicate'" in out.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The edgecv wheel, built from a copy of the sources (building in the checkout would leave build/ there)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("agent", "tools", "models", "systemd"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    out_dir = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(out_dir), str(src)], check=True, capture_output=True, timeout=300)
    return next(out_dir.glob("edgecv-*.whl"))


def test_real_venv_and_pip_install_then_the_installed_unit_verifies(tmp_path: Path, wheel: Path) -> None:
    root = tmp_path / "root"
    install(root, "--skip-pip")  # a venv without pip first: the real install below must add pip itself
    # --no-deps: the point is the installer's own work; the dependency set is pyproject's business.
    out = install(root, "--runtime", "litert", "--source", str(wheel), "--pip-args", "--no-deps")
    assert "installed " in out.stderr
    venv = root / "opt/edgecv/venv"
    agent_exe = venv / "bin/edgecv-agent"
    assert agent_exe.is_file() and os.access(agent_exe, os.X_OK)
    assert agent_exe.read_text().splitlines()[0] == f"#!{venv}/bin/python"
    listed = subprocess.run([str(venv / "bin/python"), "-m", "pip", "list", "--format=freeze"], capture_output=True,
                            text=True, check=True).stdout
    assert "edgecv==" in listed
    # The unit as installed, with only the root prefix added, passes verify against the installed binary.
    unit = root / "etc/systemd/system/edgecv-agent.service"
    staged = tmp_path / "edgecv-agent.service"
    staged.write_text(unit.read_text().replace(EXEC, str(agent_exe)))
    out = subprocess.run([systemd_analyze(), "verify", str(staged)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr
    # Running it again (an upgrade to the same version) leaves the tree as it was.
    before = tree_digest(root)
    out = install(root, "--runtime", "litert", "--source", str(wheel), "--pip-args", "--no-deps")
    assert tree_digest(root) == before
    assert "already installed" in out.stderr  # so a real install would not restart the service
    # The seed came out of the installed wheel (its data package), not out of this checkout.
    seed = root / "opt/edgecv/seed/fashion-mnist.edgecv"
    assert seed.read_bytes() == (REPO / "models/fashion-mnist.edgecv").read_bytes()


def test_the_wheel_stands_alone(tmp_path: Path, wheel: Path, shared_broker: Broker) -> None:
    """Only the `edgecv` namespace at top level, and from a fresh venv outside the checkout the demo runs with the
    shipped bundle and `init` writes a config. (Dependencies come from this test venv through a .pth file, so the
    test needs no network; everything of edgecv itself comes from the wheel.)"""
    import sysconfig
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"edgecv", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    assert "edgecv/models/fashion-mnist.edgecv" in names and "edgecv/systemd/agent.example.toml" in names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # numpy, paho, runtimes…, not edgecv
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin/python"), "install", "-q", "--no-deps",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "EDGECV_"))}
    where = subprocess.run([str(venv / "bin/python"), "-c", "import edgecv.agent; print(edgecv.agent.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site)), where
    out = subprocess.run([str(venv / "bin/edgecv-agent"), "demo", "--frames", "5", "--broker",
                          f"{shared_broker.host}:{shared_broker.port}"], cwd=work, env=env, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert "5 predictions via MQTT" in out.stdout and "fashion-mnist" in out.stderr
    out = subprocess.run([str(venv / "bin/edgecv-agent"), "init", "--device-id", "pi-new"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and 'device_id = "pi-new"' in (work / "agent.toml").read_text(), out.stderr


def test_sdist_carries_what_it_takes_to_build_and_test(tmp_path: Path) -> None:
    """The source distribution holds the tests, benchmarks, docs and scripts, and a wheel builds from it alone."""
    import tarfile

    src = tmp_path / "src"
    subprocess.run(["git", "clone", "-q", str(REPO), str(src)], check=True, timeout=120)  # committed files only
    out_dir = tmp_path / "sdist"
    subprocess.run([sys.executable, "-c", "import setuptools.build_meta as b, sys; b.build_sdist(sys.argv[1])",
                    str(out_dir)], cwd=src, check=True, capture_output=True, timeout=300)
    sdist = next(out_dir.glob("edgecv-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        tar.extractall(tmp_path / "x", filter="data")
    for needed in ("LICENSE", "pyproject.toml", "constraints.txt", "tests/conftest.py", "tests/broker.py",
                   "bench/agent_bench.py", "scripts/test.sh", "docs/ARCHITECTURE.md", "models/fashion-mnist.edgecv",
                   "models/fashion-mnist/manifest.json", "systemd/agent.example.toml", "agent/app.py",
                   "tools/cli.py"):
        assert needed in names, needed
    assert not any("__pycache__" in n for n in names)
    root = next((tmp_path / "x").iterdir())
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(root)], check=True, capture_output=True, timeout=300)
    assert len(list(wheels.glob("edgecv-*.whl"))) == 1
