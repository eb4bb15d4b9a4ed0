"""The installed package: one import namespace (`tandem`), declared dependencies equal to
what the code imports, and a wheel that serves on its own from an empty venv.

The wheel test is slow (a new venv, torch and Ray installed into it from pip's cache);
`make test PYTEST_ARGS='-m slow'` runs it alone.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.support.serve_process import serve_process

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
# Folders of the repository that hold our Python code, and the package each one is.
SOURCE_DIRS = {"cluster": "tandem.cluster", "kernels": "tandem.kernels",
               "router": "tandem.router", "workers": "tandem.workers", "deploy": "tandem.deploy"}
# Python files that are developer tools rather than part of the package.
NOT_SHIPPED = {"cluster/proto/generate.py"}
# Declared although never imported by name: torch's Tensor.numpy() and Triton's CPU
# interpreter import numpy themselves, and our code calls them.
DECLARED_WITHOUT_IMPORT = {"numpy"}


def _python_files(*dirs: str) -> list[Path]:
    files = []
    for d in dirs:
        files += [p for p in (REPO / d).rglob("*.py") if "gen" not in p.relative_to(REPO).parts]
    return sorted(files)


def _absolute_imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every absolute import in a file, nested ones included."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path}:{node.lineno}: relative import; write tandem.*")
    return found


def _dist_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _dist_name(re.match(r"[A-Za-z0-9_.-]+", requirement).group(0))


def _distribution_of(module: str, candidates: list[str]) -> str:
    """The distribution that installed `module` (a namespace such as `google` has several)."""
    if len(set(candidates)) == 1:
        return _dist_name(candidates[0])
    origin = Path(importlib.util.find_spec(module).origin).resolve()
    for name in candidates:
        dist = importlib.metadata.distribution(name)
        if any(Path(dist.locate_file(f)).resolve() == origin for f in dist.files or []):
            return _dist_name(name)
    raise AssertionError(f"{module}: none of {candidates} installed it")


def test_listed_packages_are_the_tree():
    """pyproject lists every package explicitly (the namespace mapping needs it): the list
    is exactly the folders with an __init__.py."""
    on_disk = set()
    for folder, package in SOURCE_DIRS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            on_disk.add(".".join([package, *rel.parts]))
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]) == on_disk
    package_dir = PYPROJECT["tool"]["setuptools"]["package-dir"]
    mapping = {folder: package for package, folder in package_dir.items()}
    assert mapping == SOURCE_DIRS


def test_every_import_of_ours_goes_through_tandem():
    """No file imports our code by a top-level name other than `tandem` (the folder names
    collide with other packages), and the Serve import paths follow. The repository's own
    scripts share helpers by name: tests.support (tests and bench), bench's modules (bench)."""
    ours = {p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith(".")}
    ours |= {p.stem for p in REPO.rglob("*.py") if ".venv" not in p.parts}
    ours -= {"tandem", "tests", "bench"}
    offenders = []
    for path in _python_files(*SOURCE_DIRS, "tests", "bench"):
        rel = path.relative_to(REPO)
        for line, module in _absolute_imports(path):
            top = module.split(".")[0]
            # tests.support and bench's shared modules are for the repository's own scripts
            # (run from its root), never for the package
            outside = (top == "tests" and rel.parts[0] not in ("tests", "bench")) or (
                top == "bench" and rel.parts[0] != "bench"
            )
            if top in ours or outside:
                offenders.append(f"{rel}:{line}: import {module}")
    assert offenders == []
    serve_config = (REPO / "deploy" / "serve-config.yaml").read_text(encoding="utf-8")
    chart = (REPO / "deploy/helm/tandem/templates/_serveconfig.tpl").read_text(encoding="utf-8")
    paths = re.findall(r"import_path\W+([\w.:]+)", serve_config + chart)
    assert paths and all(p == "tandem.cluster.app:build_app" for p in paths)
    assert PYPROJECT["project"]["scripts"] == {"tandem": "tandem.cluster.cli:main"}


def test_declared_dependencies_are_exactly_what_the_code_imports():
    distributions = importlib.metadata.packages_distributions()
    imported = set()
    for path in _python_files(*SOURCE_DIRS):
        if str(path.relative_to(REPO)) in NOT_SHIPPED:
            continue
        for _, module in _absolute_imports(path):
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top == "tandem":
                continue
            assert top in distributions, f"{path}: {module} comes from no installed package"
            imported.add(_distribution_of(module, distributions[top]))
    # the runtime dependencies and the optional extras of shipped features (not `dev`)
    requirements = list(PYPROJECT["project"]["dependencies"])
    for extra, extra_requirements in PYPROJECT["project"]["optional-dependencies"].items():
        if extra != "dev":
            requirements += extra_requirements
    declared = {_requirement_name(r) for r in requirements}
    assert declared == imported | DECLARED_WITHOUT_IMPORT


def _closure(root: str, extras: set[str]) -> dict[str, str]:
    """{distribution: installed version} of `root` with `extras` and everything it needs."""
    from packaging.requirements import Requirement

    versions: dict[str, str] = {}
    todo = [(root, frozenset(extras))]
    while todo:
        name, wanted = todo.pop()
        dist = importlib.metadata.distribution(name)
        versions[_dist_name(dist.metadata["Name"])] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            if _dist_name(req.name) not in versions or req.extras:
                todo.append((req.name, frozenset(req.extras)))
    return versions


def test_lock_pins_what_is_installed():
    """requirements.lock pins the exact installed version of everything tandem[dev] needs,
    so a fresh `make test` installs what was tested (`make lock` refreshes both)."""
    pins = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[_dist_name(name)] = version
    needed = _closure("tandem", {"dev"})
    del needed["tandem"]
    unpinned = {name: v for name, v in needed.items() if pins.get(name) != v}
    assert unpinned == {}, "installed at a version the lock does not pin (run `make lock`)"


# ------------------------------------------------------------------------- the wheel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
def test_wheel_serves_on_its_own_in_an_empty_venv(tmp_path):
    """Build the wheel, install it into a new venv beside transformers >= 5.25 and Hugging
    Face's `kernels` (the combination the old top-level `kernels` broke), then, from a
    directory outside the repository: only `tandem` is installed at the top level, both
    `kernels` packages import in one process, `tandem generate` prints token ids, and
    `tandem serve` answers a `tandem client` call and stops cleanly on SIGTERM."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TANDEM_REDIS_URL", "PYTHONPATH", "VIRTUAL_ENV")}
    env["TANDEM_CACHE_DIR"] = str(tmp_path / "cache")
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
          "-w", str(dist), str(REPO)], REPO, env)
    [wheel] = dist.glob("tandem-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"tandem"}
    assert "tandem/deploy/serve-config.yaml" in names
    assert "tandem/cluster/proto/tandem/v1/tandem.proto" in names

    venv = tmp_path / "venv"
    _run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)],
         tmp_path, env)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    _run([*pip, "torch==2.13.0"], tmp_path, env)
    _run([*pip, "-c", str(LOCK), str(wheel), "transformers>=5.25", "kernels"], tmp_path, env)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    python = str(venv / "bin" / "python")
    probe = (
        "import importlib.metadata as m, json, transformers, kernels, tandem.kernels.moe\n"
        "from transformers import GptOssForCausalLM\n"
        "files = m.distribution('tandem').files\n"
        "tops = {f.parts[0] for f in files if '.dist-info' not in f.parts[0] "
        "and f.parts[0] != '..'}\n"
        "print(json.dumps({'tops': sorted(tops), 'hf_kernels': kernels.__file__,\n"
        "  'transformers': transformers.__version__,\n"
        "  'ours': tandem.kernels.moe.__file__}))\n"
    )
    facts = json.loads(_run([python, "-c", probe], outside, env))
    assert facts["tops"] == ["tandem"]
    assert "site-packages/kernels/" in facts["hf_kernels"]
    assert "site-packages/tandem/kernels/" in facts["ours"]
    assert tuple(int(x) for x in facts["transformers"].split(".")[:2]) >= (5, 25)

    tandem = str(venv / "bin" / "tandem")
    out = _run([tandem, "generate", "--prompt-ids", "1,2,3", "--max-tokens", "4",
                "--temperature", "0", "--json", "--device", "cpu"], outside, env)
    [result] = [json.loads(line) for line in out.splitlines()]
    assert len(result["token_ids"]) == 4 and all(isinstance(t, int) for t in result["token_ids"])

    port = _free_port()
    with serve_process([tandem, "serve", "--grpc-port", str(port)], env, outside) as server:
        server.wait_ready(240)
        answer = _run([tandem, "client", "--target", f"127.0.0.1:{port}", "--prompt", "Hello",
                       "--max-tokens", "4", "--temperature", "0", "--json"], outside, env, 120)
        chunks = [json.loads(line) for line in answer.splitlines()]
        assert sum(len(c.get("token_ids", [])) for c in chunks) == 4, answer
        assert server.stop() == 0, server.tail()
        lines = server.lines
    assert "tandem: shutting down\n" in lines
