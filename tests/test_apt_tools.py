""".ci/apt-tools leaves the machine as it found it: the packages CI installs for a run are purged,
and the folders they touched hold again what they held before, no more and no less.

The machine is a folder here and apt is faked over it: the script's own logic runs, and the
mutations below (one of its steps undone each) must make the check fail.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

# Fakes of dpkg-query, dpkg and apt-get over a folder that stands for the machine's root: each
# package owns the paths listed here (a folder's ends with /), and a purge takes its files and its
# folders that are empty, as dpkg does (an empty /etc/sudoers.d that was there before too).
FAKE_APT = r'''#!/usr/bin/env python3
import json, os, sys
from pathlib import Path
root, db = Path(os.environ["APT_TOOLS_ROOT"]), Path(os.environ["FAKE_DPKG"])
owned = json.loads(os.environ["FAKE_PACKAGES"])
installed = db.read_text().split()
tool, args = Path(sys.argv[0]).name, sys.argv[1:]
pkgs = [a for a in args if not a.startswith("-") and a not in ("update", "install", "purge")]
if tool == "dpkg-query":
    if args[-1].startswith("${"):
        print("".join(f"installed {p}\n" for p in installed), end="")
    else:
        sys.exit(0 if args[-1] in installed and print("installed", end="") is None else 1)
elif tool == "dpkg":
    print("\n".join("/" + path.rstrip("/") for p in pkgs for path in owned[p]))
elif "install" in args:
    for p in pkgs:
        for path in owned[p]:
            (root / path).mkdir(parents=True, exist_ok=True) if path.endswith("/") else \
                (root / path).write_text(p)
    db.write_text(" ".join(installed + pkgs))
elif "purge" in args:
    for path in sorted((x for p in pkgs for x in owned[p]), reverse=True):
        target = root / path
        if target.is_file():
            target.unlink()
        elif target.is_dir() and not any(target.iterdir()):
            target.rmdir()
    db.write_text(" ".join(p for p in installed if p not in pkgs))
'''
PACKAGES = {"podman": ["etc/containers/", "etc/containers/containers.conf.d/",
                       "etc/containers/registries.conf", "usr/bin/podman"],
            "sudo": ["etc/sudoers.d/", "etc/sudoers.d/README", "etc/sudo.conf"]}


def machine(root: Path) -> dict[str, tuple]:
    """Every path under root: its kind, mode and content."""
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_mode,
                                       None if p.is_dir() else p.read_bytes())
            for p in root.rglob("*")}


def apt_tools_run(tmp: Path, old: str = "", new: str = "") -> tuple[dict, dict]:
    """The machine before `.ci/apt-tools add` and after podman's use and `remove`, with the
    script's old text replaced by new."""
    root, bin_ = tmp / "root", tmp / "bin"
    for folder in ("etc/sudoers.d", "etc/containers/containers.conf.d", "var/cache/apt/archives",
                   "var/lib/containers/cache", "usr/bin"):
        (root / folder).mkdir(parents=True)
    (root / "etc/hostname").write_text("ci\n")
    (root / "var/lib/containers/cache/blob-info").write_text("kept")
    bin_.mkdir()
    for tool in ("dpkg-query", "dpkg", "apt-get"):
        (bin_ / tool).write_text(FAKE_APT)
        (bin_ / tool).chmod(0o755)
    (tmp / "dpkg").write_text("base-files")
    script = tmp / "apt-tools"
    text = (ROOT / ".ci/apt-tools").read_text()
    assert old in text, f".ci/apt-tools no longer contains {old!r}: update this case"
    script.write_text(text.replace(old, new) if old else text)
    env = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}", APT_TOOLS_ROOT=str(root),
               FAKE_DPKG=str(tmp / "dpkg"), FAKE_PACKAGES=json.dumps(PACKAGES))
    before = machine(root)
    state = tmp / "state"
    subprocess.run(["bash", script, "add", state, "podman", "sudo"], env=env, check=True,
                   capture_output=True)
    # podman's use: a network file of its own, images and its cache, none of any package
    (root / "var/lib/containers/cache/blob-info").write_text("changed")
    (root / "etc/containers/networks").mkdir()
    (root / "etc/containers/networks/podman.json").write_text("{}")
    (root / "var/lib/containers/storage/overlay").mkdir(parents=True)
    (root / "var/cache/apt/archives/podman.deb").write_text("deb")
    subprocess.run(["bash", script, "remove", state], env=env, check=True, capture_output=True)
    return before, machine(root)


def test_apt_tools_leave_the_machine_as_found(tmp_path):
    before, after = apt_tools_run(tmp_path)
    assert after == before


@pytest.mark.parametrize("old,new", [
    ('tar -C "$root" -xpf', "true"),  # what the purge took is not put back
    ("xargs -r -d '\\n' rm -rf --", "cat >/dev/null"),  # what podman made stays
    ("apt-get purge -y -qq", "true"),  # nothing purged
    ('-xpf "$state/kept.tar"', '-xpf "$state/kept.tar" --skip-old-files'),  # changes stay
])
def test_apt_tools_check_catches(tmp_path, old, new):
    before, after = apt_tools_run(tmp_path, old, new)
    assert after != before
