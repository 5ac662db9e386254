"""Recipes as files: ``--config FILE.toml`` (flags win over the file, the file over the
preset and the defaults), the presets shipped as TOML inside the package, and bad files."""

from __future__ import annotations

import pytest
from test_train import assert_one_line_error, make_text, tiny_args

from fastchar.training import checkpoint, cli, config


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(make_text())
    return path


def _run(tmp_path, text_file, toml: str, *flags):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(toml)
    out = tmp_path / "run"
    code = cli.main(
        [*tiny_args(text_file, out, "--sample-length", "0"), "--config", str(recipe), *flags]
    )
    return code, out


def test_a_file_sets_fields_and_flags_win(tmp_path, text_file, capsys):
    toml = 'hidden = 24\ndropout = 0\nmodel = "gru"\nlr = 0.002\nstateful = true\nsteps = 4\n'
    code, out = _run(tmp_path, text_file, toml, "--hidden", "12")
    assert code == 0, capsys.readouterr().err
    cfg = checkpoint.load_checkpoint(str(out))["config"]
    assert cfg["hidden"] == 12  # the flag over the file
    assert cfg["model"] == "gru" and cfg["lr"] == 0.002 and cfg["stateful"] is True
    assert cfg["dropout"] == 0.0 and isinstance(cfg["dropout"], float)  # an int is a float
    assert cfg["steps"] == 6  # tiny_args's --steps 6 over the file's 4


def test_the_file_wins_over_the_preset(tmp_path, text_file, capsys):
    code, out = _run(tmp_path, text_file, 'preset = "shakespeare"\nlayers = 1\nhidden = 16\n',
                     "--time-limit", "60", "--eval-iters", "2")  # fmt: skip
    assert code == 0, capsys.readouterr().err
    cfg = checkpoint.load_checkpoint(str(out))["config"]
    assert cfg["preset"] == "shakespeare" and cfg["layers"] == 1
    assert cfg["stateful"] is True and cfg["block_size"] == 16  # preset, then the flag


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("hiden = 24\n", "unknown key 'hiden'"),
        ('hidden = "big"\n', "hidden must be an integer, got 'big'"),
        ("hidden = 2.5\n", "hidden must be an integer, got 2.5"),
        ("stateful = 1\n", "stateful must be true or false, got 1"),
        ("dropout = true\n", "dropout must be a number, got True"),
        ("model = 3\n", "model must be a string, got 3"),
        ("hidden = \n", "not valid TOML"),
    ],
)
def test_a_bad_file_is_one_line_and_exit_2(tmp_path, text_file, capsys, toml, message):
    code, out = _run(tmp_path, text_file, toml)
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert_one_line_error(err)
    assert not out.exists()


def test_a_file_that_is_not_utf8_is_one_line_and_exit_2(tmp_path, text_file, capsys):
    recipe = tmp_path / "recipe.toml"
    recipe.write_bytes(b"\xff\xfehidden = 3\n")
    assert cli.main([*tiny_args(text_file, tmp_path / "run"), "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "not valid TOML" in err


def test_a_file_with_a_byte_order_mark_is_read(tmp_path, text_file, capsys):
    code, out = _run(tmp_path, text_file, "\ufefflr = 0.003\n")
    assert code == 0, capsys.readouterr().err
    assert checkpoint.load_checkpoint(str(out))["config"]["lr"] == 0.003


def test_a_missing_file_is_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["--config", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "cannot read it" in err


def test_presets_are_toml_files_in_the_package():
    files = sorted(p.stem for p in config._PRESET_DIR.glob("*.toml"))
    assert files == list(config.PRESET_NAMES) and "shakespeare" in files
    recipe = config.PRESETS["shakespeare"]
    assert recipe["data"] == "shakespeare" and recipe["hidden"] == 512 and recipe["stateful"]
    assert config.TrainConfig(**recipe).validate().time_limit == 575.0
