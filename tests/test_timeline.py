"""Memory within one step: one recorded step (neuromanifold_gpt/timeline.py says which), which
leaves the run's figures alone and shows what checkpointing does (a lower hill of activations)."""

import pytest

from neuromanifold_gpt.config.cli import parse_args
from neuromanifold_gpt.errors import NonFiniteLoss
from neuromanifold_gpt.memory import GIB
from neuromanifold_gpt.plots import read_trace
from neuromanifold_gpt.timeline import timeline_rows
from neuromanifold_gpt.trainer import train

WIDER = ["--n_embd", "64", "--batch_size", "16", "--block_size", "64", "--max_iters", "3"]


def test_rows_follow_the_phase_marks():
    events = [(100, 2 * GIB), (150, GIB), (300, -GIB), (400, GIB), (500, -3 * GIB)]
    marks = [(90, "forward"), (200, "backward"), (450, "optimizer")]
    assert timeline_rows(events, marks) == [(0.0, 2.0, "forward"), (0.05, 3.0, "forward"),
                                            (0.2, 2.0, "backward"), (0.3, 3.0, "backward"),
                                            (0.4, 0.0, "optimizer")]


def test_the_recorded_step_leaves_the_run_alone_and_shows_the_saving(tiny_args, tmp_path):
    plain = train(parse_args(tiny_args + WIDER), quiet=True)
    peaks = {}
    for checkpointed in ("false", "true"):
        path = tmp_path / f"{checkpointed}.tsv"
        m = train(parse_args(tiny_args + WIDER + ["--gradient_checkpointing", checkpointed,
                                                  "--memory_timeline_file", str(path)]), quiet=True)
        assert m["iters"] == plain["iters"] and m["losses"] == pytest.approx(plain["losses"], rel=1e-6)
        tl = read_trace(path)
        assert tl["phase"][0] == "forward" and tl["phase"][-1] == "optimizer"
        assert set(tl["phase"]) == {"forward", "backward", "optimizer"}
        assert tl["time_ms"] == sorted(tl["time_ms"])
        # from what the step begins with, so the curve reaches the run's peak
        assert max(tl["allocated_gb"]) == pytest.approx(m["peak_memory_gb"], rel=1e-3)
        backward = tl["phase"].index("backward")
        peaks[checkpointed] = max(tl["allocated_gb"][:backward + 1])  # what forward leaves for backward
    assert peaks["true"] < 0.6 * peaks["false"]


def test_the_per_step_plot_shows_what_each_run_held(monkeypatch, tmp_path):
    """Under CUDA graphs both runs allocate alike after the recording step; what they hold
    (the reservation) still tells them apart, so the plot draws both figures per run."""
    from neuromanifold_gpt import plots

    shown = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: shown.setdefault("fig", fig))
    trace = {"baseline": dict(step=[1, 2], peak_memory_gb=[5.7, 1.9], peak_reserved_gb=[5.8, 5.8]),
             "checkpointed": dict(step=[1, 2], peak_memory_gb=[2.4, 1.9], peak_reserved_gb=[2.8, 2.8])}
    plots.plot_memory_per_step({"gpt2": trace}, tmp_path / "p.png")
    lines = {line.get_label(): list(line.get_ydata()) for line in shown["fig"].axes[0].lines}
    assert lines == {"baseline: allocated": [5.7, 1.9], "baseline: reserved": [5.8, 5.8],
                     "checkpointed: allocated": [2.4, 1.9], "checkpointed: reserved": [2.8, 2.8]}


def graphs_said(monkeypatch):
    """Every run's plan says cuda_graphs (on the CPU, where no graph is made); the Trainer class."""
    from neuromanifold_gpt import trainer as trainer_mod

    plan_run = trainer_mod.plan_run

    def with_graphs(cfg):
        plan, *rest = plan_run(cfg)
        return (plan.replace(cuda_graphs=True), *rest)

    monkeypatch.setattr(trainer_mod, "plan_run", with_graphs)
    return trainer_mod.Trainer


def test_a_run_replaying_cuda_graphs_records_the_step_that_captures_them(tiny_args, tmp_path,
                                                                         monkeypatch):
    """Under CUDA graphs the allocator sees a step's tensors only while the graphs are captured
    (the first step after warm-up): that step is recorded, and no extra step is run. The plan
    is made to say cuda_graphs on this CPU run (whose recorded step then enters the tensor count
    inside the counted step: a storage counts once either way); graphs themselves need CUDA
    (tests/test_gpu.py)."""
    trainer_class = graphs_said(monkeypatch)
    steps, step = [], trainer_class.train_step

    def counted(self):
        steps.append((self.iter_num, self.on_phase.__qualname__))  # whose on_phase: recording or not
        return step(self)

    monkeypatch.setattr(trainer_class, "train_step", counted)
    path = tmp_path / "t.tsv"
    m = train(parse_args(tiny_args + WIDER + ["--memory_timeline_file", str(path)]), quiet=True)
    recording = [i for i, owner in steps if owner.startswith("_Recording")]
    assert len(steps) == m["iters"] == 3 and recording == [1]
    tl = read_trace(path)
    assert set(tl["phase"]) == {"forward", "backward", "optimizer"}
    assert max(tl["allocated_gb"]) == pytest.approx(m["peak_memory_gb"], rel=1e-3)


@pytest.mark.parametrize("at", [1, 2], ids=["in the captured step", "after it"])
@pytest.mark.parametrize("fault", ["interrupt", "non-finite"])
def test_a_run_stopped_leaves_no_timeline_of_its_own(fault, at, tiny_args, tmp_path, monkeypatch):
    """The captured step's timeline is written when the run ends: a run stopped in that step or
    after it leaves an earlier file as it was (an interrupt) or the header alone (a failed run's
    files), and the recording stops (no counting mode left on, the trainer's phase hook back)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    trainer_class = graphs_said(monkeypatch)
    step, seen = trainer_class.train_step, []

    error = KeyboardInterrupt if fault == "interrupt" else NonFiniteLoss

    def failing(self):
        seen.append(self)
        if self.iter_num == at:
            self.on_phase("forward")  # under way
            raise error("stopped")
        return step(self)

    monkeypatch.setattr(trainer_class, "train_step", failing)
    path = tmp_path / "t.tsv"
    path.write_text("an earlier run's timeline\n")
    with pytest.raises(error):
        train(parse_args(tiny_args + WIDER + ["--max_iters", "4", "--memory_timeline_file", str(path)]),
              quiet=True)
    expected = "an earlier run's timeline\n" if fault == "interrupt" else "time_ms\tallocated_gb\tphase\n"
    assert path.read_text() == expected
    assert _get_current_dispatch_mode_stack() == []
    assert seen[-1].on_phase.__qualname__ == "Trainer.__init__.<locals>.<lambda>"
