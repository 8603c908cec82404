"""Launcher slips (issue 27): a typo in a setting, a wrong value, an unknown config file and
an output directory that cannot be made each end the launcher with exactly one `error:` line
on stderr and a non-zero status, before any model is loaded.

Every command points --config.model at a directory that does not exist: were a slip missed,
the job would stop at the model with a different message (MissingFileError), so no test can
pass by loading or downloading a model.
"""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(module, *args, cwd=REPO):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HARMJAX_XLA_CACHE": "off", "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                          text=True, env=env, timeout=180)


def _one_error_line(result) -> str:
    assert result.returncode != 0, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
def no_model(tmp_path):
    return f"--config.model={tmp_path / 'no_such_model'}"


@pytest.mark.parametrize("with_config", [True, False], ids=["with --config", "default config"])
def test_setting_typo_names_the_setting_and_the_closest_one(no_model, with_config):
    # Without --config, ml_collections parses the default file and the overrides while the
    # flag is defined (at import), a different code path from the parse under absl.
    args = (["--config=configs/embedded.py"] if with_config else []) + [no_model, "--config.prompts.per_categroy=3"]
    line = _one_error_line(_launch("launch.run", *args))
    assert line == "error: unknown setting prompts.per_categroy; did you mean prompts.per_category?"


def test_unknown_setting_without_a_close_match_lists_its_siblings(no_model):
    line = _one_error_line(_launch("launch.run", "--config=configs/embedded.py", no_model, "--config.masks.zzzzzz=1"))
    assert line.startswith("error: unknown setting masks.zzzzzz; the settings of masks are: ")
    from configs.embedded import get_config

    listed = line.split(" are: ", 1)[1].split(", ")
    assert sorted(listed) == sorted(get_config().masks.keys())


def test_unknown_config_file(no_model):
    line = _one_error_line(_launch("launch.run", "--config=configs/no_such_config.py", no_model))
    assert line.startswith("error: config file configs/no_such_config.py not found")


@pytest.mark.parametrize("override, expect", [
    ("--config.prompts.per_category=abc", "error: --config.prompts.per_category=abc: not an int"),
    # ml_collections would take "abc" as a tuple of strings and fail minutes later.
    ("--config.masks.q_sweep=abc", "error: --config.masks.q_sweep=abc: expected numbers"),
])
def test_value_of_the_wrong_type(no_model, override, expect):
    line = _one_error_line(_launch("launch.run", "--config=configs/embedded.py", no_model, override))
    assert line.startswith(expect), line


@pytest.mark.parametrize("module, config", [("launch.run", "configs/embedded.py"), ("launch.score", "configs/score.py")])
def test_output_dir_that_cannot_be_created(tmp_path, no_model, module, config):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = blocker / "out"
    line = _one_error_line(_launch(module, f"--config={config}", no_model, f"--config.output_dir={out}"))
    assert line.startswith(f"error: --config.output_dir={out}: cannot create or write this directory")


def test_valid_overrides_pass_the_checks_and_reach_the_model(tmp_path, no_model):
    """The guards reject nothing valid: correct overrides (an int, a tuple, a new output
    directory) get as far as loading the model, which here is missing."""
    out = tmp_path / "new" / "out"
    result = _launch("launch.run", "--config=configs/embedded.py", no_model, "--config.prompts.per_category=3",
                     "--config.masks.q_sweep=(1e-5,2e-5)", f"--config.output_dir={out}")
    line = _one_error_line(result)
    assert line.startswith("error: MissingFileError: ") and "no_such_model" in line, line
    assert out.is_dir()
