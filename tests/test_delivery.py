"""The Dockerfile, scripts/image.sh, the workflows and .ci/run run the commands the README
documents, safely.

The README's quick start and Docker section are the reference. The Dockerfile must run the quick
start's installs; scripts/image.sh, run here with a `docker` that only records its arguments,
must run exactly the README's container commands; the GPU workflow's steps must be that script's
phases, in the order .ci/image runs them on the CPU; ci.yml's steps must be ones .ci/as-runner
runs here, handing .ci/run the corpus and the CPU torch wheel where it looks for them. The linters
of .ci/run run here too when they are installed (under CI=true, a missing one fails).
"""

import importlib.machinery
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10, where pytest depends on tomli
    import tomli as tomllib

from neuromanifold_gpt.data import cached_corpus
from tests.conftest import ROOT

FILES = ["README.md", "Dockerfile", ".dockerignore", ".ci/run", ".ci/image", "pyproject.toml",
         "scripts/image.sh", ".github/workflows/ci.yml", ".github/workflows/gpu.yml", "params.yaml"]
IMAGE = "neuromanifold-gpt"  # the README's image name; scripts/image.sh adds a tag of its content
# Options that change what pip prints or caches, or where it looks first, not what it installs.
QUIET = {"-q", "--quiet", "--no-cache-dir"}
WHERE = {"--find-links"}  # ... each followed by a value
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")


def words(cmd: str) -> list[str]:
    """One shell command as comparable words: `python3 -m pip` is `pip`, quiet options dropped."""
    w = [x for x in shlex.split(cmd, comments=True) if x not in QUIET]
    w = [x for i, x in enumerate(w) if x not in WHERE and (i == 0 or w[i - 1] not in WHERE)]
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


def readme_containers(readme: str) -> list[list[str]]:
    """The Docker section's `docker build` and `docker run --user` lines, as words."""
    lines = readme.split("<!-- section: docker -->")[-1].replace("\\\n", " ").splitlines()
    found = commands("\n".join(ln for ln in lines if ln.lstrip().startswith("docker ")))
    return [c for c in found if c[1] == "build" or "--user" in c]


# scripts/image.sh's phases that run the README's commands: (GPUS, arguments)
SCRIPT_PHASES = [("", ["build"]), ("", ["check"]), ("all", ["repro"]), ("", ["repro"]),
                 ("", ["diff"])]
# A `docker` that appends its arguments, as one JSON line, to docker.log beside it.
RECORDER = ("#!/bin/sh\nexec python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "
            "\"$@\" >> \"$0.log\"\n")


def script_containers(f: dict[str, str]) -> tuple[list[list[str]], list[str]]:
    """The docker commands scripts/image.sh's phases run, with the README's placeholders
    ($PWD, $HOME, the user) put back, and any phase that failed."""
    with tempfile.TemporaryDirectory() as tmp:
        root, home, bin_ = Path(tmp, "checkout"), Path(tmp, "home"), Path(tmp, "bin")
        for name in ("scripts/image.sh", "Dockerfile", "requirements.txt"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(f[name] if name in f else (ROOT / name).read_text())
        bin_.mkdir()
        (bin_ / "docker").write_text(RECORDER)
        (bin_ / "docker").chmod(0o755)
        failed = []
        for gpus, args in SCRIPT_PHASES:
            env = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}", HOME=str(home), GPUS=gpus)
            env.pop("BASE_IMAGE", None)
            done = subprocess.run(["bash", str(root / "scripts/image.sh"), *args], env=env,
                                  capture_output=True, text=True, timeout=60)
            if done.returncode:
                failed.append(f"scripts/image.sh {shlex.join(args)}: exit {done.returncode} "
                              f"{done.stderr.strip()}")
        log = bin_ / "docker.log"
        calls = [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []
    user = f"{os.getuid()}:{os.getgid()}"
    back = [(str(root), "$PWD"), (str(home), "$HOME")]
    out = []
    for call in calls:
        words = ["docker"]
        for w in call:
            for path, name in back:
                w = w.replace(path, name)
            w = "$(id -u):$(id -g)" if w == user else w
            words.append(IMAGE if w.startswith(IMAGE + ":") else w)
        out.append(words)
    return out, failed


def script_phases(text: str, prefix: list[str]) -> list[list[str]]:
    """The arguments of each command of a script that starts with prefix, redirections dropped."""
    found = []
    for cmd in commands(text):
        if cmd[:len(prefix)] == prefix:
            args = cmd[len(prefix):]
            found.append(args[:args.index(">")] if ">" in args else args)
    return found


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
    # RUN's own options (--mount=...) come before the command.
    runs = [c for kw, args in instr if kw == "RUN"
            for c in commands(re.sub(r"^(--\S+\s+)+", "", args))]
    copies = {shlex.split(args)[0]: shlex.split(args)[-1] for kw, args in instr if kw == "COPY"}
    mounts = re.findall(r"--mount=\S*source=([^,\s]+)", f["Dockerfile"])
    build_args = dict(a.split("=", 1) for kw, a in instr if kw == "ARG" and "=" in a)
    base = next(args for kw, args in instr if kw == "FROM").split()[0]
    if named := re.fullmatch(r"\$\{?(\w+)\}?", base):
        base = build_args.get(named.group(1), base)
    if not re.fullmatch(r"\S+:\S+@sha256:[0-9a-f]{64}", base):
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

    # The build context is an allow-list: every COPY or mount source must be let through.
    rules = [ln.strip() for ln in f[".dockerignore"].splitlines()
             if ln.strip() and not ln.startswith("#")]
    if rules[:1] != ["*"]:
        problems.append(".dockerignore: must start with '*' (an allow-list)")
    for src in [*copies, *mounts]:
        if "!" + src not in rules:
            problems.append(f".dockerignore: {src} is used by the Dockerfile but not allowed")
    return problems


def check_workflows(f: dict[str, str]) -> list[str]:
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

    # The GPU workflow runs scripts/image.sh's phases as .ci/image runs them on the CPU, plus
    # --gpus all, and runs no container of its own.
    gpu = workflow(f[".github/workflows/gpu.yml"])
    jobs = [j for j in gpu["jobs"].values() if "self-hosted" in j["runs-on"]]
    gpu_runs = "\n".join(run_steps(j) for j in jobs)
    if any(c[0] == "docker" for c in commands(gpu_runs)):
        problems.append("gpu.yml: runs docker itself; its steps must be scripts/image.sh's phases")
    if any(j.get("env", {}).get("GPUS") != "all" for j in jobs):
        problems.append("gpu.yml: a GPU job does not set GPUS: all")
    gpu_phases = script_phases(gpu_runs, ["bash", "scripts/image.sh"])
    ci_phases = [c[2:] for c in script_phases(f[".ci/image"], ["phase"]) if c[1:2] == ["as_user"]]
    if not ci_phases or gpu_phases != ci_phases:
        problems.append(f"gpu.yml: its steps {gpu_phases} are not the phases .ci/image runs, in "
                        f"its order: {ci_phases}")
    return problems


def as_runner():
    """.ci/as-runner as a module: its plan() reads a workflow as it runs it."""
    loader = importlib.machinery.SourceFileLoader("as_runner", str(ROOT / ".ci/as-runner"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def check_ci_steps(f: dict[str, str]) -> list[str]:
    """ci.yml's steps are the ones .ci/as-runner runs on this machine, and they hand .ci/run the
    Python of its torch wheel, the wheel in wheels/, and the corpus where the pipeline caches it."""
    runner = as_runner()
    try:
        steps = runner.plan(workflow(f[".github/workflows/ci.yml"]), {})
    except runner.Unknown as e:
        return [f"ci.yml: a step .ci/as-runner cannot run ({e})"]
    problems = []
    runs = [args[0].strip() for what, args in steps if what == "run"]
    if runs != ["bash .ci/run"]:
        problems.append(f"ci.yml: its run steps {runs} are not `bash .ci/run` alone")
    wheel = re.search(r"^TORCH_WHEEL=(\S+)$", f[".ci/run"], re.M).group(1)
    python = ".".join(re.search(r"-cp(\d)(\d+)-", wheel).groups())
    pythons = [args[0] for what, args in steps if what == "python"]
    if pythons != [python]:
        problems.append(f"ci.yml: setup-python {pythons} is not {python}, the Python of .ci/run's "
                        f"{wheel}")
    caches = {args[0]: args[1] for what, args in steps if what == "restore"}
    sha = yaml.safe_load(f["params.yaml"])["data"]["sha256"]
    corpus = f"~/.cache/neuromanifold_gpt/{cached_corpus(sha).name}"
    if sha not in caches.get(corpus, ""):
        problems.append(f"ci.yml: no actions/cache of {corpus} keyed by params.yaml's sha256")
    if f"wheels/{wheel}" not in caches:
        problems.append(f"ci.yml: no actions/cache of wheels/{wheel}, the wheel .ci/run takes")
    return problems


def problems(f: dict[str, str]) -> list[str]:
    """Every way the delivery files disagree with the README or break a safety rule."""
    pipeline, tests = quick_start(f["README.md"])
    found = check_image(f, pipeline)
    if not contains_in_order(commands(f[".ci/run"]), tests):
        found.append(".ci/run: does not run the README's test line: "
                     + " && ".join(map(shlex.join, tests)))

    readme = readme_containers(f["README.md"])
    script, failed = script_containers(f)
    found += failed
    found += [f"scripts/image.sh: does not run the README's {shlex.join(c)}"
              for c in readme if c not in script]
    found += [f"README.md: its Docker section does not show {shlex.join(c)} "
              "(run by scripts/image.sh)" for c in script if c not in readme]
    if not any("--gpus" in c and c[-len(pipeline[-1]):] == pipeline[-1] for c in readme):
        found.append(f"README.md: no `docker run --gpus ... {shlex.join(pipeline[-1])}` in its "
                     "Docker section")
    return found + check_workflows(f) + check_ci_steps(f)


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
    ("README.md", '--gpus all --user "$(id -u):$(id -g)" -v "$PWD":/work -w /work',
     '--gpus all --user "$(id -u):$(id -g)" -v "$PWD":/work',
     "scripts/image.sh: does not run the README's docker run --rm --gpus"),
    ("README.md", "neuromanifold-gpt dvc metrics diff main", "neuromanifold-gpt dvc metrics diff origin/main",
     "scripts/image.sh: does not run the README's"),
    ("README.md", "print(torch.__version__, torch.cuda.is_available())", "print(torch.__version__)",
     "scripts/image.sh: does not run the README's"),
    ("scripts/image.sh", "-w /work \\\n", "\\\n", "its Docker section does not show"),
    ("scripts/image.sh", 'gpus=(--gpus "$GPUS")', "gpus=()",
     "scripts/image.sh: does not run the README's docker run --rm --gpus"),
    ("scripts/image.sh", "diff) run dvc metrics diff main --targets metrics/verify.json ;;", "",
     "scripts/image.sh diff: exit 2"),
    ("scripts/image.sh", "diff main --targets metrics/verify.json ;;", "diff main ;;",
     "its Docker section does not show"),
    ("pyproject.toml", 'file = ["requirements.txt"]', 'file = ["requirements-gpu.txt"]',
     "pyproject.toml: dependencies"),
    (".dockerignore", "!requirements.txt", "", ".dockerignore: requirements.txt"),
    (".dockerignore", "!wheels", "", ".dockerignore: wheels"),
    ("Dockerfile", "pip install --no-cache-dir --find-links /wheels torch==2.13.0 \\\n    && ", "",
     "Dockerfile: does not run"),
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
    (".github/workflows/gpu.yml", "run: bash scripts/image.sh check",
     "run: docker run --rm neuromanifold-gpt python3 -c 1", "gpu.yml: runs docker itself"),
    (".github/workflows/gpu.yml", "GPUS: all", "GPUS: ''", "does not set GPUS: all"),
    (".github/workflows/gpu.yml", "run: bash scripts/image.sh repro --force",
     "run: bash scripts/image.sh repro", "are not the phases .ci/image runs"),
    (".ci/image", "phase diff as_user diff\n", "", "are not the phases .ci/image runs"),
    (".github/workflows/ci.yml", "key: tinyshakespeare-86c4e6aa9db7c042", "key: tinyshakespeare-",
     "keyed by params.yaml's sha256"),
    ("params.yaml", "sha256: 86c4e6aa9db7c042", "sha256: 96c4e6aa9db7c042",
     "keyed by params.yaml's sha256"),
    (".github/workflows/ci.yml", "path: ~/.cache/neuromanifold_gpt/", "path: ~/.cache/",
     "keyed by params.yaml's sha256"),
    (".github/workflows/ci.yml", 'python-version: "3.11"', 'python-version: "3.12"',
     "setup-python ['3.12'] is not 3.11"),
    (".ci/run", "TORCH_WHEEL=torch-2.13.0+cpu-cp311-cp311", "TORCH_WHEEL=torch-2.13.0+cpu-cp312-cp312",
     "setup-python ['3.11'] is not 3.12"),
    (".github/workflows/ci.yml", "path: wheels/torch-2.13.0+cpu", "path: wheels/torch-2.12.0+cpu",
     "no actions/cache of wheels/"),
    (".github/workflows/ci.yml", "      - name: .ci/run\n",
     "      - uses: actions/upload-artifact@ea165f8d65b6e75b540449e92b4886f43607fa02 # v4.6.2\n"
     "      - name: .ci/run\n", "a step .ci/as-runner cannot run"),
    (".github/workflows/ci.yml", "run: bash .ci/run", "run: |\n          pip install torch\n"
     "          bash .ci/run", "are not `bash .ci/run` alone"),
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
        message = f"{tool} is not installed (pip install -e '.[dev]')"
        if os.environ.get("CI") == "true":  # CI must lint, never skip it
            pytest.fail(message)
        pytest.skip(message)
    done = subprocess.run(line, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


# -- the README as a newcomer reads it -------------------------------------------------------
README_MAX_LINES = 200
QUICK_START = ["pip install torch==2.13.0 && pip install -e . && dvc repro",
               'pip install torch==2.13.0 && pip install -e ".[dev]" && python3 -m pytest tests']
# a measured figure: a number with a unit of memory or time, a share or a ratio
FIGURE = re.compile(r"\b\d+(\.\d+)?\s*(GiB|GB|MiB|ms|s\b|%|x\b)")
COMMIT = re.compile(r"\b[0-9a-f]{7,40}\b")


def readme_prose(readme: str) -> str:
    """The README without its code blocks, inline code and generated results table."""
    readme = re.sub(r"<!-- results:begin -->.*?<!-- results:end -->", "", readme, flags=re.S)
    readme = re.sub(r"```.*?```", "", readme, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", readme)


def readme_problems(readme: str) -> list[str]:
    found = [f"README.md has {len(readme.splitlines())} lines, more than {README_MAX_LINES}"
             ] if len(readme.splitlines()) > README_MAX_LINES else []
    found += [f"README.md quick start lacks `{line}`" for line in QUICK_START
              if line not in readme.splitlines()]
    if "export NEUROMANIFOLD_CORPUS=" not in readme:
        found.append("README.md quick start lacks the offline corpus note")
    found += [f"README.md types a figure by hand: {m.group(0)!r}; generate it "
              "(python3 -m neuromanifold_gpt.results)" for m in FIGURE.finditer(readme_prose(readme))]
    found += [f"README.md names a commit: {m.group(0)}" for m in COMMIT.finditer(readme)]
    return found


def test_readme_is_short_has_the_quick_start_and_no_typed_figure(files):
    assert readme_problems(files["README.md"]) == []


@pytest.mark.parametrize("old, new, complaint", [
    ("## Training by hand", "Block checkpointing saves 58.1% at gpt2.\n\n## Training by hand",
     "types a figure by hand: '58.1%'"),
    ("## Training by hand", "It steps 34.2 ms.\n\n## Training by hand", "types a figure by hand: '34.2 ms'"),
    ("## Training by hand", "Measured at f1837a4.\n\n## Training by hand", "names a commit: f1837a4"),
    ("## Training by hand", "\n" * README_MAX_LINES + "## Training by hand", "more than 200"),
    ("pip install -e . && dvc repro", "pip install -e . && dvc repro --force", "quick start lacks"),
])
def test_readme_drift_is_caught(files, old, new, complaint):
    assert old in files["README.md"]
    found = readme_problems(files["README.md"].replace(old, new, 1))
    assert any(complaint in p for p in found), found

