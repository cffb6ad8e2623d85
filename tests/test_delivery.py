"""The Dockerfile, the workflows and .ci/run run the commands the README documents, safely.

Docker and a GitHub runner are not available to the tests, so these read the files: the
README's quick start and Docker lines are the reference, and each delivery file must run the
same install, `dvc repro` and `dvc metrics diff` commands. The linters of .ci/run run here too
when they are installed.
"""

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10, where pytest depends on tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
FILES = ["README.md", "Dockerfile", ".dockerignore", ".ci/run", "pyproject.toml",
         ".github/workflows/ci.yml", ".github/workflows/gpu.yml"]
IMAGE = "neuromanifold-gpt"  # the README's image name; gpu.yml names its build "$IMAGE"
# Options that change what pip prints or caches, not what it installs.
QUIET = {"-q", "--quiet", "--no-cache-dir"}
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")


def words(cmd: str) -> list[str]:
    """One shell command as comparable words: `python3 -m pip` is `pip`, quiet options dropped."""
    w = [x for x in shlex.split(cmd, comments=True) if x not in QUIET]
    return ["pip"] + w[3:] if w[:3] == ["python3", "-m", "pip"] else w


def commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script, continuations joined and `&&` chains split."""
    out = []
    for line in script.replace("\\\n", " ").splitlines():
        out += [w for part in line.split("&&") if (w := words(part))]
    return out


def contains_in_order(haystack: list, needles: list) -> bool:
    it = iter(haystack)
    return all(any(n == h for h in it) for n in needles)


def quick_start(readme: str) -> tuple[list[list[str]], list[list[str]]]:
    """The quick start's pipeline line and test line, each as its commands."""
    block = re.search(r"## Quick start\n.*?```bash\n(.*?)```", readme, re.S)
    assert block, "README.md: no ```bash block under '## Quick start'"
    lines = [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(lines) == 2, f"README.md quick start: expected a pipeline and a test line, got {lines}"
    return commands(lines[0]), commands(lines[1])


def docker_runs(text: str) -> list[list[str]]:
    """The `docker run` commands of a text, as words, output redirections dropped."""
    lines = text.replace("\\\n", " ").splitlines()
    found = []
    for cmd in commands("\n".join(ln for ln in lines if ln.lstrip().startswith("docker run"))):
        cmd = cmd[:cmd.index(">")] if ">" in cmd else cmd
        found.append([IMAGE if w == "$IMAGE" else w for w in cmd])
    return found


def gpu_run(runs: list[list[str]], repro: list[str]) -> list[str] | None:
    return next((c for c in runs if "--gpus" in c and c[-len(repro):] == repro), None)


def diff_run(runs: list[list[str]]) -> list[str] | None:
    return next((c for c in runs if " dvc metrics diff " in f" {' '.join(c)} "), None)


def dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and continuations joined."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in joined.splitlines()
            if ln.strip()]


def workflow(text: str) -> dict:
    wf = yaml.safe_load(text)
    wf["on"] = wf.pop(True, wf.get("on"))  # YAML 1.1 reads the bare key `on` as true
    return wf


def run_steps(job: dict) -> str:
    return "\n".join(s["run"] for s in job["steps"] if "run" in s)


def check_image(f: dict[str, str], pipeline: list[list[str]]) -> list[str]:
    problems = []
    instr = dockerfile(f["Dockerfile"])
    runs = [c for kw, args in instr if kw == "RUN" for c in commands(args)]
    copies = {shlex.split(args)[0]: shlex.split(args)[-1] for kw, args in instr if kw == "COPY"}
    base = next(args for kw, args in instr if kw == "FROM")
    if not re.fullmatch(r"\S+:\S+@sha256:[0-9a-f]{64}", base.split()[0]):
        problems.append(f"Dockerfile: base image {base!r} is not pinned by tag and digest")
    env = [w for kw, args in instr if kw == "ENV" for w in shlex.split(args)]
    if "DVC_NO_ANALYTICS=1" not in env:
        problems.append("Dockerfile: DVC_NO_ANALYTICS=1 is not set")
    user = [args.split(":")[0] for kw, args in instr if kw == "USER"]
    if not user or user[-1] in ("root", "0"):
        problems.append("Dockerfile: the image runs as root")
    if not any(c[:2] == ["apt-get", "install"] and "git" in c for c in runs):
        problems.append("Dockerfile: git (needed by DVC) is not installed")

    # The quick start's installs, in order; `pip install -e .` becomes the requirements file
    # that pyproject.toml reads, since the package itself comes from the mounted checkout.
    project = tomllib.loads(f["pyproject.toml"])
    dynamic = project.get("tool", {}).get("setuptools", {}).get("dynamic", {})
    req_files = dynamic.get("dependencies", {}).get("file", [])
    if "dependencies" in project["project"] or req_files != ["requirements.txt"]:
        problems.append("pyproject.toml: dependencies must come from requirements.txt alone "
                        "(tool.setuptools.dynamic), the list the Dockerfile installs")
    expected = []
    for cmd in pipeline[:-1]:
        editable = re.fullmatch(r"\.(?:\[(.*)\])?", cmd[-1]) if cmd[-2:-1] == ["-e"] else None
        if editable and editable.group(1):
            problems.append(f"README installs extras [{editable.group(1)}] for the pipeline; "
                            "the image installs only requirements.txt")
        expected.append(["pip", "install", "-r", copies.get("requirements.txt", "?")]
                        if editable else cmd)
    if not contains_in_order(runs, expected):
        problems.append("Dockerfile: does not run the README's installs, in order: "
                        + "; ".join(map(shlex.join, expected)))
    cmd = next((json.loads(args) for kw, args in instr if kw == "CMD"), None)
    if cmd != pipeline[-1]:
        problems.append(f"Dockerfile: CMD {cmd} is not the README's {shlex.join(pipeline[-1])}")

    # The build context is an allow-list: every COPY source must be let through.
    rules = [ln.strip() for ln in f[".dockerignore"].splitlines()
             if ln.strip() and not ln.startswith("#")]
    if rules[:1] != ["*"]:
        problems.append(".dockerignore: must start with '*' (an allow-list)")
    for src in copies:
        if "!" + src not in rules:
            problems.append(f".dockerignore: {src} is copied by the Dockerfile but not allowed")
    return problems


def check_workflows(f: dict[str, str], repro: list[str], readme_gpu: list[str] | None,
                    readme_diff: list[str] | None) -> list[str]:
    problems = []
    for name in ("ci.yml", "gpu.yml"):
        wf = workflow(f[".github/workflows/" + name])
        if "pull_request_target" in wf["on"]:
            problems.append(f"{name}: pull_request_target runs with a write token")
        if "write" in json.dumps(wf.get("permissions", "write-all")):
            problems.append(f"{name}: top-level permissions must be read-only")
        if "concurrency" not in wf:
            problems.append(f"{name}: no concurrency group")
        for job_id, job in wf["jobs"].items():
            if "timeout-minutes" not in job:
                problems.append(f"{name}: job {job_id} has no timeout-minutes")
            self_hosted = "self-hosted" in job["runs-on"]
            if self_hosted and "write" in json.dumps(job.get("permissions", {})):
                problems.append(f"{name}: job {job_id} gives a write token to a self-hosted runner")
            if self_hosted and "head.repo.full_name == github.repository" not in job.get("if", ""):
                problems.append(f"{name}: job {job_id} may run a fork's code on a self-hosted runner")
            for step in job["steps"]:
                uses = step.get("uses")
                if uses and not PINNED.match(uses):
                    problems.append(f"{name}: {uses} is not pinned by commit SHA")
                if uses and uses.startswith("actions/checkout@"):
                    with_ = step.get("with", {})
                    if with_.get("persist-credentials") is not False:
                        problems.append(f"{name}: checkout keeps the token (persist-credentials)")
                    if with_.get("fetch-depth") != 0:
                        problems.append(f"{name}: a shallow checkout has no main to diff against")

    ci = workflow(f[".github/workflows/ci.yml"])
    if not any(["bash", ".ci/run"] in commands(run_steps(j)) for j in ci["jobs"].values()):
        problems.append("ci.yml: does not run `bash .ci/run`")

    gpu = workflow(f[".github/workflows/gpu.yml"])
    gpu_runs = "\n".join(run_steps(j) for j in gpu["jobs"].values())
    if not any(c[:2] == ["docker", "build"] and c[-1] == "." for c in commands(gpu_runs)):
        problems.append("gpu.yml: does not build the image")
    if readme_gpu and gpu_run(docker_runs(gpu_runs), repro) != readme_gpu:
        problems.append(f"gpu.yml: does not run the README's {shlex.join(readme_gpu)}")
    if readme_diff and diff_run(docker_runs(gpu_runs)) != readme_diff + ["--md", "--all"]:
        problems.append(f"gpu.yml: does not run the README's {shlex.join(readme_diff)} --md --all")
    return problems


def problems(f: dict[str, str]) -> list[str]:
    """Every way the delivery files disagree with the README or break a safety rule."""
    pipeline, tests = quick_start(f["README.md"])
    found = check_image(f, pipeline)
    if not contains_in_order(commands(f[".ci/run"]), tests):
        found.append(".ci/run: does not run the README's test line: "
                     + " && ".join(map(shlex.join, tests)))

    runs = docker_runs(f["README.md"].split("<!-- section: docker -->")[-1])
    readme_gpu, readme_diff = gpu_run(runs, pipeline[-1]), diff_run(runs)
    if readme_gpu is None:
        found.append(f"README.md: no `docker run --gpus ... {shlex.join(pipeline[-1])}` in its "
                     "docker section")
    if readme_diff is None:
        found.append("README.md: no `docker run ... dvc metrics diff` in its docker section")
    header = "\n".join(ln.lstrip("# ") for ln in f["Dockerfile"].splitlines() if ln.startswith("#"))
    if readme_gpu and gpu_run(docker_runs(header), pipeline[-1]) != readme_gpu:
        found.append("Dockerfile: its header's `docker run` is not the README's GPU run line")
    return found + check_workflows(f, pipeline[-1], readme_gpu, readme_diff)


@pytest.fixture(scope="module")
def files() -> dict[str, str]:
    return {name: (ROOT / name).read_text() for name in FILES}


def test_delivery_files_follow_the_readme(files):
    assert problems(files) == []


# Each edit below is a drift the check must catch: (file, old text, new text, expected complaint).
DRIFTS = [
    ("README.md", "pip install torch==2.13.0 && pip install -e . &&",
     "pip install torch==2.14.1 && pip install -e . &&", "Dockerfile: does not run"),
    ("README.md", "pip install torch==2.13.0 && pip install -e \".[dev]\"",
     "pip install torch==2.14.1 && pip install -e \".[dev]\"", ".ci/run: does not run"),
    ("README.md", "pip install -e . && dvc repro", "pip install -e \".[gpu]\" && dvc repro",
     "installs extras [gpu]"),
    ("README.md", "&& python3 -m pytest tests\n", "&& python3 -m pytest tests -x\n",
     ".ci/run: does not run"),
    ("README.md", "pip install -e . && dvc repro", "pip install -e . && dvc exp run",
     "Dockerfile: CMD"),
    ("README.md", '--gpus all --user "$(id -u):$(id -g)" -v "$PWD":/work -w /work neuromanifold-gpt',
     '--gpus all -v "$PWD":/work -w /work neuromanifold-gpt',
     "gpu.yml: does not run the README's docker run --rm --gpus"),
    ("README.md", "neuromanifold-gpt dvc metrics diff main",
     "neuromanifold-gpt dvc metrics diff origin/main", "gpu.yml: does not run the README's"),
    ("pyproject.toml", 'file = ["requirements.txt"]', 'file = ["requirements-gpu.txt"]',
     "pyproject.toml: dependencies"),
    (".dockerignore", "!requirements.txt", "", ".dockerignore: requirements.txt"),
    ("Dockerfile", "pip install --no-cache-dir torch==2.13.0 && ", "", "Dockerfile: does not run"),
    ("Dockerfile", "USER 10001:10001", "USER root", "runs as root"),
    ("Dockerfile", "slim-bookworm@sha256:", "slim-bookworm #", "not pinned by tag and digest"),
    (".ci/run", "python3 -m pytest tests", "python3 -m pytest tests/test_cli.py",
     ".ci/run: does not run"),
    (".github/workflows/ci.yml", "run: bash .ci/run", "run: python3 -m pytest tests",
     "ci.yml: does not run"),
    (".github/workflows/gpu.yml", "workflow_dispatch:", "workflow_dispatch:\n  pull_request_target:",
     "pull_request_target"),
    (".github/workflows/gpu.yml", "head.repo.full_name == github.repository &&", "",
     "may run a fork's code"),
    (".github/workflows/gpu.yml", "contents: read # check out the code",
     "contents: read\n      pull-requests: write", "write token to a self-hosted runner"),
    (".github/workflows/gpu.yml", "fetch-depth: 0", "fetch-depth: 1", "shallow checkout"),
    (".github/workflows/gpu.yml", "actions/checkout@11bd71901bbe5b1630ceea73d27597364c9af683",
     "actions/checkout@v4", "not pinned by commit SHA"),
    (".github/workflows/ci.yml", "persist-credentials: false", "persist-credentials: true",
     "keeps the token"),
    (".github/workflows/gpu.yml", "dvc metrics diff main --md --all", "dvc metrics diff main --md",
     "dvc metrics diff main --md --all"),
]


@pytest.mark.parametrize("name,old,new,complaint", DRIFTS, ids=[d[3] for d in DRIFTS])
def test_drift_is_caught(files, name, old, new, complaint):
    assert old in files[name], f"{name} no longer contains {old!r}: update this case"
    changed = dict(files, **{name: files[name].replace(old, new)})
    found = problems(changed)
    assert any(complaint in p for p in found), found


LINTERS = ("hadolint", "zizmor", "check-jsonschema")


def lint_lines() -> list[str]:
    lines = (ROOT / ".ci/run").read_text().splitlines()
    return [ln for ln in lines if ln.split(" ", 1)[0] in LINTERS]


def test_ci_runs_every_linter():
    assert sorted(ln.split(" ", 1)[0] for ln in lint_lines()) == sorted(LINTERS)


@pytest.mark.parametrize("line", lint_lines(), ids=lambda ln: ln.split(" ", 1)[0])
def test_linter_finds_nothing(line):
    tool = line.split(" ", 1)[0]
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (pip install -e '.[dev]')")
    done = subprocess.run(line, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
