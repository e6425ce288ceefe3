"""deploy/: the systemd unit verifies, the Containerfile's paths exist, serve.yml is valid."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from backend import serveconfig

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "burrow.service"
CONTAINERFILE = DEPLOY / "Containerfile"
INSTALLED = "/opt/burrow/bin/burrow"


def _verify(unit: Path) -> tuple[int, list[str]]:
    """``systemd-analyze verify``; the lines it says about this unit (it exits 0 on
    warnings such as an unknown key, so those count as failures here)."""
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if unit.name in ln]
    return r.returncode, lines


def _runnable_copy(tmp_path: Path, text: str) -> Path:
    """The unit with its ExecStart pointing at this checkout's installed ``burrow``
    (verify checks that the binary exists; on a server it is /opt/burrow/bin/burrow)."""
    exe = shutil.which("burrow")
    if exe is None:
        pytest.skip("the burrow command is not installed (pip install -e .)")
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(INSTALLED, exe))
    return unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_systemd_unit_verifies_cleanly(tmp_path):
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED} serve --config /etc/burrow/serve.yml" in text
    code, lines = _verify(_runnable_copy(tmp_path, text))
    assert code == 0 and not lines, lines
    # the check itself catches a mistake
    bad = tmp_path / "bad"
    bad.mkdir()
    code, lines = _verify(_runnable_copy(bad, text.replace("ProtectSystem=strict", "ProtectSystem=strictest")))
    assert lines, "systemd-analyze accepted a bad ProtectSystem value"


def test_the_unit_has_the_hardening_it_promises():
    settings = {}
    for ln in UNIT.read_text().splitlines():
        if "=" in ln and not ln.lstrip().startswith("#"):
            k, _, v = ln.partition("=")
            settings.setdefault(k.strip(), v.strip())
    assert settings["DynamicUser"] == "yes"
    assert settings["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert settings["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert settings["ProtectSystem"] == "strict"
    assert settings["StateDirectory"] == "burrow" and settings["StateDirectoryMode"] == "0700"
    assert settings["NoNewPrivileges"] == "yes" and settings["UMask"] == "0077"
    # the data dir the unit gives is the one serve.yml names
    assert settings["Environment"] == "BURROW_DATA_DIR=/var/lib/burrow"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for ln in text.splitlines():
        if not buf and (not ln.strip() or ln.lstrip().startswith("#")):
            continue
        buf += ln.rstrip("\\").strip() + " "
        if not ln.endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def test_the_containerfile_copies_what_exists_and_what_the_build_needs():
    steps = _instructions(CONTAINERFILE.read_text())
    assert steps[0][0] == "FROM"
    copied: dict[str, str] = {}  # source -> destination
    for word, args in steps:
        if word in ("COPY", "ADD"):
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            assert "--from" not in args
            *sources, dest = parts
            for src in sources:
                assert (ROOT / src).exists(), f"{word} {src}: no such path in the repository"
                copied[src.rstrip("/")] = dest
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # `pip install .` needs the project file, its readme and every package it finds
    assert "pyproject.toml" in copied and project["project"]["readme"] in copied
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in copied, f"package {pattern} is not copied"
    # the project itself, with the ACME extra the example config's acme_directory needs
    assert any(w == "RUN" and "pip install" in a and " '.[acme]'" in a for w, a in steps)
    assert "acme" in project["project"]["optional-dependencies"]
    # the entrypoint is the project's command, reading the config that was copied in
    entry = next(a for w, a in steps if w == "ENTRYPOINT")
    argv = json.loads(entry)
    assert argv[0] in project["project"]["scripts"] and argv[1] == "serve"
    assert argv[argv.index("--config") + 1] == copied["deploy/serve.yml"]
    # the ports it exposes are the ones the config listens on
    exposed = {int(p) for w, a in steps if w == "EXPOSE" for p in a.split()}
    conf = serveconfig.load({}, DEPLOY / "serve.yml")
    for addr in (conf.http_addr, conf.https_addr, conf.ingress_addr):
        assert int(addr.rsplit(":", 1)[1]) in exposed
    assert next(a for w, a in steps if w == "USER") != "root"


def test_the_example_config_is_valid_and_public(monkeypatch):
    for name in list(os.environ):
        if name.startswith("BURROW_"):
            monkeypatch.delenv(name)
    conf = serveconfig.load({}, DEPLOY / "serve.yml")
    assert conf.data_dir == Path("/var/lib/burrow")
    assert conf.http_addr.endswith(":80") and conf.https_addr.endswith(":443")
    assert conf.ingress_addr.endswith(":4042")
    assert conf.api_addr.startswith("127.0.0.1:")  # the plain-HTTP API stays on loopback
    assert conf.admin_key is None  # secrets come from the environment, not this file
    assert conf.acme_directory and conf.acme_email  # public certificates on a public host
