"""The command line: stage names are command names, hyphens work too, and the 0.1 spellings still run (with a
deprecation warning) until the next release."""
from pathlib import Path

import pytest
from typer.testing import CliRunner

from components.cli import app


@pytest.fixture
def empty(tmp_path, monkeypatch) -> Path:
    """A working directory with default params and no data."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    return tmp_path


def errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("stage, old", [("train_rqvae", ["rqvae", "train"]), ("train_ranker", ["ranker", "train"])])
def test_old_spellings_warn_and_run_the_stage_command(empty, stage, old):
    new = CliRunner().invoke(app, [stage])
    hyphenated = CliRunner().invoke(app, [stage.replace("_", "-")])
    deprecated = CliRunner().invoke(app, old)
    assert new.exit_code == hyphenated.exit_code == deprecated.exit_code == 1  # no data here: the stage's own error
    assert errors(new) == errors(hyphenated) == errors(deprecated) and len(errors(new)) == 1
    assert "deprecated" not in new.stderr
    assert f"`semid {' '.join(old)}` is deprecated" in deprecated.stderr and f"use `semid {stage}`" in deprecated.stderr


def test_movielens_source_without_a_directory_names_the_param(empty):
    (empty / "params.yaml").write_text("data:\n  source: movielens\n")
    result = CliRunner().invoke(app, ["generate"])
    assert result.exit_code == 1
    assert errors(result) == ["error: params.yaml: data.movielens_dir is null; data.source 'movielens' needs the "
                              "directory of a MovieLens release (set it in params.yaml or with "
                              "-S data.movielens_dir=PATH)"]
    assert not (empty / "data").exists()
