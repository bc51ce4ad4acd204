"""The lock files pin what pyproject.toml asks for: `make run` and `make test` install from them
with `--require-hashes`, so a dependency added to pyproject.toml without `make lock` would install
nothing new (or fail there); this says so in CI instead."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCKED_EXTRAS = ("ml", "dev", "local")
# installed apart from the lock: its build (CPU or CUDA) depends on the machine (see the Makefile)
NOT_LOCKED = {"torch"}


def locked(path: Path) -> dict[str, tuple[str, list[str]]]:
    """{package: (version, hashes)} of a pip-compile --generate-hashes file."""
    out: dict[str, tuple[str, list[str]]] = {}
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)(.*)$", line.split(" #")[0].strip())
        if m:
            out[canonicalize_name(m[1])] = (m[2], re.findall(r"--hash=sha256:([0-9a-f]{64})", m[3]))
    return out


def asked() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in LOCKED_EXTRAS:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def test_every_dependency_of_pyproject_is_locked_at_a_version_it_admits_with_hashes():
    lock = locked(ROOT / "requirements.lock")
    for req in asked():
        name = canonicalize_name(req.name)
        if name in NOT_LOCKED:
            assert name not in lock, f"{name} is installed apart from the lock"
            continue
        assert name in lock, f"{req} is not in requirements.lock: run `make lock`"
        version, hashes = lock[name]
        assert req.specifier.contains(version, prereleases=True), (
            f"{req}: locked at {version}; run `make lock`"
        )
        assert hashes, f"{name} has no hash in requirements.lock"
    assert all(hashes for _, hashes in lock.values())


def test_the_bundled_model_wheels_are_locked_with_hashes():
    lock = locked(ROOT / "requirements-models.lock")
    wanted = [
        Requirement(line.split("#")[0])
        for line in (ROOT / "requirements-models.in").read_text().splitlines()
        if line.split("#")[0].strip()
    ]
    assert {canonicalize_name(r.name) for r in wanted} == set(lock)
    for req in wanted:
        version, hashes = lock[canonicalize_name(req.name)]
        assert req.specifier.contains(version) and len(hashes) == 1


def test_the_reader_sees_a_package_missing_from_a_lock(tmp_path):
    """The check above could fail: a lock without one of pyproject's packages is caught."""
    lock = (ROOT / "requirements.lock").read_text()
    cut = re.sub(r"(?ms)^fastapi==.*?(?=^\S)", "", lock)
    (tmp_path / "requirements.lock").write_text(cut)
    assert "fastapi" in locked(ROOT / "requirements.lock") and "fastapi" not in locked(
        tmp_path / "requirements.lock"
    )
