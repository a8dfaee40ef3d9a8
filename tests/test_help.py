"""The command line's help: --help shows tl_keras's flags by config group; absl's stay under --helpfull."""

import dataclasses
import os
import re
import shutil
import subprocess

from absl.testing import flagsaver
import pytest

from tl_keras import config as config_lib
from tl_keras import flags as tl_flags

from helpers import REPO, run_cli

TITLES = [title for _, title in config_lib.GROUPS]


def test_help_text_lists_every_setting_once_under_its_group():
    text = tl_flags.help_text()
    assert text.startswith("usage: tl-keras --flagfile=FILE")
    blocks = {}
    for block in text.split("\n\n"):
        title, _, body = block.partition("\n")
        blocks[title] = body
    for field in dataclasses.fields(config_lib.Config):
        heading = re.compile(rf"^  --(\[no\])?{field.name}\b", re.M)
        assert len(heading.findall(text)) == 1, field.name
        title = dict(config_lib.GROUPS)[config_lib.group_of(field.name)]
        assert heading.search(blocks[title]), (field.name, title)
    assert text.rstrip().endswith("absl's own flags: --helpfull")


def test_help_text_shows_defaults_and_choices():
    text = tl_flags.help_text()
    assert "  --image_size (default: 32)\n" in text
    assert "  --[no]head_batchnorm (default: true)\n" in text
    assert "  --mode=<train|evaluate|export|predict|lr_find> (default: train)\n" in text
    assert "  --head_units (default: 256)\n" in text
    assert all(len(line) <= 100 for line in text.splitlines())


@pytest.mark.parametrize("arg", ["--help", "-h", "--helpshort", "-?"])
def test_parse_prints_help_and_exits_0(arg, capsys):
    with flagsaver.flagsaver(), pytest.raises(SystemExit) as exit_info:
        tl_flags.parse(["prog", "--image_size=64", arg])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == tl_flags.help_text()


def test_parse_turns_flag_errors_into_one_line():
    with flagsaver.flagsaver(), pytest.raises(SystemExit) as exit_info:
        tl_flags.parse(["prog", "--no_such_flag=1"])
    assert str(exit_info.value.code) == "tl_keras: error: Unknown command line flag 'no_such_flag'"


def _assert_is_our_help(result):
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert out.startswith("usage: ")
    assert "python -m tl_keras.main" in out
    for title in TITLES:
        assert f"\n{title}\n" in out, title
    assert "--image_size (default: 32)" in out
    assert "logtostderr" not in out and "--verbosity" not in out  # absl's own flags.


@pytest.mark.slow
def test_python_m_help_shows_the_trainers_flags():
    _assert_is_our_help(run_cli("--help", timeout=120))


@pytest.mark.slow
def test_console_script_help_shows_the_trainers_flags():
    """absl looks up key flags by sys.argv[0], which differs for the console script; ours does not."""
    script = shutil.which("tl-keras")
    if script is None:
        pytest.skip("the tl-keras console script is not installed (pip install -e .)")
    result = subprocess.run([script, "--help"], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                            capture_output=True, text=True, timeout=120)
    _assert_is_our_help(result)


@pytest.mark.slow
def test_helpfull_is_still_absls_full_listing():
    result = run_cli("--helpfull", timeout=120)
    assert "--[no]logtostderr" in result.stdout
    assert "--image_size:" in result.stdout
    assert "bench_examples" not in result.stdout
