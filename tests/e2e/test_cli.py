"""The `omnimol` command line: every subcommand has --help; info/init/check-hf work end to end."""
import json
import re

import pytest

from omnimol_jax.cli import build_parser, main


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("import-hf", "export-hf", "info", "init", "check-hf"):
        assert name in out


@pytest.mark.parametrize("command", _subcommands())
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: omnimol " + command in capsys.readouterr().out


def test_info_reports_parameter_count_and_rejects_typos(capsys):
    assert main(["info", "model.preset=llama3_2_1b"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("# parameters:"))
    assert "language model 1,235,814,400" in line  # and the graph tower and projector, as train counts them
    total = int(line.split()[2].replace(",", ""))
    parts = [int(n.replace(",", "")) for n in re.findall(r"(?:model|tower|projector) ([\d,]+)", line)]
    assert len(parts) == 3 and sum(parts) == total > 1_235_814_400
    assert main(["info", "model.num_layrs=3"]) == 2
    assert "did you mean 'num_layers'" in capsys.readouterr().err


def test_init_export_check_round_trip(tmp_path, capsys):
    assert main(["init", "--out", str(tmp_path / "ckpt"), "mesh.fsdp=2"]) == 0
    assert main(["export-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert main(["check-hf", "--checkpoint", str(tmp_path / "ckpt"), "--hf", str(tmp_path / "hf"),
                 "--seq-lens", "5,300"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and [r["seq_len"] for r in report["reports"]] == [5, 300]
    assert all(r["max_abs_diff"] <= 1e-4 and r["top1_agreement"] == 1.0 for r in report["reports"])
    # different weights (another seed) must fail the check
    assert main(["init", "--out", str(tmp_path / "other"), "seed=1"]) == 0
    assert main(["export-hf", "--checkpoint", str(tmp_path / "other"), "--out", str(tmp_path / "hf_other")]) == 0
    capsys.readouterr()
    assert main(["check-hf", "--checkpoint", str(tmp_path / "ckpt"), "--hf", str(tmp_path / "hf_other"),
                 "--seq-lens", "5"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False


def test_a_flag_spelled_config_key_is_told_the_key_value_syntax(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--config", "configs/demo.yaml", "--init.hf", "/models/llama"])
    assert info.value.code == 2
    assert "config overrides are key=value, e.g. init.hf=VALUE" in capsys.readouterr().err


def test_overrides_after_a_flag_are_still_overrides(capsys):
    """argparse ends the key=value positional at the first flag; the CLI takes later key=values as overrides too
    (here one the config rejects, so nothing runs)."""
    assert main(["train", "--config", "configs/demo.yaml", "--no-progress", "train.max_steps=0"]) != 0
    err = capsys.readouterr().err
    assert "train.max_steps" in err and "unrecognized" not in err
