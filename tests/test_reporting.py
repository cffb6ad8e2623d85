"""The run's record as reporting builds it from a trainer."""

import pytest

from neuromanifold_gpt import reporting
from neuromanifold_gpt.config.cli import parse_args
from neuromanifold_gpt.record import RunRecord
from neuromanifold_gpt.trainer import Trainer, plan_run


@pytest.mark.parametrize("compile, unit", [("true", "block"), ("false", None)])
def test_compile_unit_is_recorded_only_for_a_compiled_run(compile, unit, data_dir, tmp_path):
    cfg = parse_args(["--data_dir", str(data_dir), "--dataset", "tiny", "--n_layer", "2", "--n_head", "2",
                      "--n_embd", "32", "--batch_size", "2", "--block_size", "16", "--compile", compile,
                      "--lean_loss", "true"])
    trainer = Trainer(cfg, *plan_run(cfg), quiet=True)
    trainer.build()  # compile is lazy: nothing is traced here
    RunRecord(**reporting._run_facts(trainer)).write(tmp_path / "m.json")
    assert RunRecord.read(tmp_path / "m.json").compile_unit == unit  # read back: the schema holds
