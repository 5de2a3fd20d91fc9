"""Recipes: --help, and bad arguments end with one clear message before any training."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from conftest import load_script

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _recipe(name: str):
    return load_script(RECIPES / f"{name}.py")


def _fails(name: str, argv: list[str], message: str, capsys, tmp_path) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        _recipe(name).main(argv + (["--output-dir", str(out)] if "--output-dir" not in argv
                                   else []))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err, err
    assert not out.exists(), "the recipe started writing before refusing its arguments"


@pytest.mark.parametrize("name", ["vit_split_imagenet", "pmnist_lenet",
                                  "efficientnet_split_fmnist"])
def test_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _recipe(name).main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--budget" in out and "--log-with" in out


def test_unknown_model(capsys, tmp_path):
    _fails("vit_split_imagenet", ["--model", "vit_nonexistent_999"],
           "--model 'vit_nonexistent_999' is not a timm model", capsys, tmp_path)


def test_not_a_vit(capsys, tmp_path):
    _fails("vit_split_imagenet", ["--model", "resnet18"],
           "--model must be a timm vit_* model", capsys, tmp_path)


def test_depth_out_of_range(capsys, tmp_path):
    _fails("vit_split_imagenet", ["--depth", "0"], "--depth must be >= 1, got 0", capsys, tmp_path)


def test_budget_out_of_range(capsys, tmp_path):
    _fails("vit_split_imagenet", ["--budget", "1.5"], "--budget must be in (0, 1], got 1.5",
           capsys, tmp_path)
    _fails("efficientnet_split_fmnist", ["--budget", "0"], "--budget must be in (0, 1]",
           capsys, tmp_path)


def test_more_tasks_than_classes(capsys, tmp_path):
    _fails("vit_split_imagenet", ["--num-tasks", "20"],
           "`num_tasks`=20 x `classes_per_task`=0 needs", capsys, tmp_path)
    _fails("vit_split_imagenet", ["--num-tasks", "4", "--classes-per-task", "3"],
           "needs 12 classes; the dataset has 10", capsys, tmp_path)
    _fails("pmnist_lenet", ["--num-tasks", "11"], "--num-tasks must be in 1..10", capsys,
           tmp_path)


def test_unwritable_output_folder(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user that can write anywhere")
        _fails("vit_split_imagenet", ["--output-dir", str(locked / "run")],
               "is not a writable folder", capsys, tmp_path)
    finally:
        locked.chmod(0o700)


def test_output_folder_that_is_a_file(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _fails("vit_split_imagenet", ["--output-dir", str(blocker / "run")],
           "is not a writable folder", capsys, tmp_path)


def test_dataset_without_a_label_column(capsys, tmp_path):
    folder = tmp_path / "flat_images"
    folder.mkdir()
    for i in range(4):  # images straight in the folder: imagefolder finds no classes
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.png")
    (folder / "test").mkdir()
    _fails("vit_split_imagenet", ["--dataset", str(folder), "--test-split", "train"],
           "`label_column`: the dataset has no such column", capsys, tmp_path)


def test_class_order_that_is_not_a_permutation(capsys, tmp_path):
    _fails("vit_split_imagenet", ["--class-order", "0,1,2"],
           "`class_order` must be a permutation of 0..9", capsys, tmp_path)


def test_output_dir_with_no_existing_ancestor_is_an_error_not_a_hang(monkeypatch, capsys):
    """Windows: `--output-dir Z:\\runs` on a missing drive; Path.exists is False up to the root."""
    import argparse

    from halrp_adapt.training.recipes import check_output_dir

    monkeypatch.setattr(Path, "exists", lambda self: False)
    with pytest.raises(SystemExit):
        check_output_dir(argparse.ArgumentParser(prog="recipe"), "Z/runs")
    assert "neither it nor any folder above it exists" in capsys.readouterr().err
