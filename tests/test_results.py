"""The results pages and the README's table are generated from the committed files: they
match what the files give, name the card, torch, CUDA, commit and code hash the files name,
follow a changed figure, take either shape of verify.json, and show bench reports."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from neuromanifold_gpt import results
from neuromanifold_gpt.params import RUNS, run_files
from tests.conftest import one_line_error

ROOT = Path(__file__).resolve().parents[1]
NEW_VERIFY_KEYS = ("baseline_peak_gb", "optimized_peak_gb", "reduction_gb", "reduction_pct",
                   "step_time_ratio", "loss_diff", "passed")


@pytest.fixture(scope="module")
def committed(tmp_path_factory) -> Path:
    """The committed tree (HEAD), checked out apart: `dvc repro` on this machine replaces the
    workspace's metrics with its own, and the pages hold what is committed. Outside a git
    checkout (an unpacked release), the files as they are."""
    if not (ROOT / ".git").exists():
        yield ROOT
        return
    tree = tmp_path_factory.mktemp("committed") / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--quiet", "--detach", str(tree), "HEAD"],
                   check=True)
    try:
        yield tree
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)


def committed_runs(root: Path) -> list[dict]:
    sizes = json.loads((root / "metrics/verify.json").read_text())["sizes"]
    return [json.loads(run_files(size, run, root)["metrics"].read_text()) for size in sizes for run in RUNS]


@pytest.fixture
def checkout(committed, tmp_path) -> Path:
    """The files the generator reads and writes, copied out of the committed tree."""
    for name in ("metrics", "docs/results", "benchmarks/results"):
        if (committed / name).is_dir():
            shutil.copytree(committed / name, tmp_path / name)
    shutil.copy(committed / "README.md", tmp_path / "README.md")
    return tmp_path


def test_committed_pages_and_readme_table_are_what_the_files_give(committed):
    pages, plots, block = results.render(committed, results.BENCH)
    for path, text in pages.items():
        assert (committed / path).read_text() == text, f"{path} differs: python3 -m neuromanifold_gpt.results"
    for path in plots:
        assert (committed / path).is_file(), f"{path} is missing: python3 -m neuromanifold_gpt.results"
    assert results.stale(committed, pages, plots) == []
    readme = (committed / "README.md").read_text()
    assert block in readme and results.splice(readme, block) == readme
    assert results.main(["--root", str(committed), "--check"]) == 0


def test_the_page_names_card_torch_cuda_commit_and_code_hash_from_the_files(committed):
    runs = committed_runs(committed)
    page = (committed / results.PAGES / f"{results.slug(runs[0]['device_name'])}.md").read_text()
    for run in runs:
        for key in ("device_name", "torch_version", "cuda_version", "git_commit", "code_hash"):
            assert str(run[key]) in page, f"the page lacks {key} {run[key]}"
    sizes = json.loads((committed / "metrics/verify.json").read_text())["sizes"]
    readme = (committed / "README.md").read_text()
    for size, h in sizes.items():
        row = f"| {h['baseline_peak_gb']:.3f} | {h['optimized_peak_gb']:.3f} | {h['reduction_gb']:.3f} " \
              f"({h['reduction_pct']:.1f}%) | {h['step_time_ratio']:.2f} |"
        assert row in page and row in readme, f"{size}: {row} is not in the page and the README"


def test_a_changed_figure_is_caught_and_regenerated(checkout, capsys):
    verify = checkout / "metrics/verify.json"
    data = json.loads(verify.read_text())
    size = next(iter(data["sizes"]))
    data["sizes"][size]["reduction_pct"] += 1.0
    verify.write_text(json.dumps(data))
    assert results.main(["--root", str(checkout), "--check"]) == 1
    out = capsys.readouterr().out
    page = f"docs/results/{results.slug(committed_runs(checkout)[0]['device_name'])}.md"
    assert f"{page} differs" in out and "README.md differs" in out
    assert results.main(["--root", str(checkout)]) == 0
    assert results.main(["--root", str(checkout), "--check"]) == 0
    assert f"({data['sizes'][size]['reduction_pct']:.1f}%)" in (checkout / "README.md").read_text()


def test_either_shape_of_verify_json_gives_the_same_pages(checkout):
    before = results.render(checkout, results.BENCH)
    verify = checkout / "metrics/verify.json"
    data = json.loads(verify.read_text())
    data["sizes"] = {s: {k: v[k] for k in NEW_VERIFY_KEYS} for s, v in data["sizes"].items()}
    verify.write_text(json.dumps(data))
    assert results.render(checkout, results.BENCH) == before


def bench_row(label: str, impl: str, peak: float, step: float) -> dict:
    return dict(preset="gpt2", label=label, impl=impl, oom=False, peak_allocated_gb=peak,
                peak_reserved_gb=peak + 0.1, step_ms=step, step_ms_min=step - 0.5, step_ms_max=step + 0.5,
                time_vs_baseline=step / 30.0, predicted_gb=None if impl == "hf" else peak * 1.02,
                predictor_error=None if impl == "hf" else 0.02,
                memory_source="torch.cuda.max_memory_allocated")


def test_a_bench_report_gets_its_table_and_pareto_plot_and_goes_with_its_file(checkout):
    report = checkout / "benchmarks/results/a-card/bench.json"
    report.parent.mkdir(parents=True)
    rows = [bench_row("compiled none", "ours", 6.5, 30.0), bench_row("compiled block", "ours", 3.25, 34.0),
            bench_row("reference", "whole", 6.75, 31.0), bench_row("HF eager", "hf", 17.5, 95.0),
            dict(preset="gpt2", label="compiled mlp", impl="ours", oom=True)]
    report.write_text(json.dumps(dict(device="A Card", torch_version="9.9.9", steps=20, repeat=3,
                                      rows=rows)))
    assert results.main(["--root", str(checkout)]) == 0
    page = (checkout / "docs/results/a-card.md").read_text()
    assert "## Bench: `benchmarks/results/a-card/bench.json`" in page and "torch 9.9.9" in page
    assert "| gpt2 | compiled block | 3.25 | 3.35 | 34.0 | 33.5-34.5 | 1.13 | 3.31 (+2.0%) |" in page
    assert "| gpt2 | HF eager | 17.50 | 17.60 | 95.0 | 94.5-95.5 | 3.17 |  |" in page
    assert "| gpt2 | compiled mlp | OOM |" in page
    png = checkout / "docs/results/a-card-a-card.png"
    assert f"]({png.name})" in page and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results.main(["--root", str(checkout), "--check"]) == 0
    report.unlink()  # the report goes, and so do its page and plot
    assert results.main(["--root", str(checkout), "--check"]) == 1
    assert results.main(["--root", str(checkout)]) == 0
    assert not png.exists() and not (checkout / "docs/results/a-card.md").exists()


def test_a_readme_without_markers_is_one_line_and_exit_2(checkout, capsys):
    readme = checkout / "README.md"
    readme.write_text(readme.read_text().replace(results.BEGIN, ""))
    before = readme.read_text()
    assert results.main(["--root", str(checkout)]) == 2
    assert "needs one <!-- results:begin -->" in one_line_error(capsys)
    assert readme.read_text() == before
