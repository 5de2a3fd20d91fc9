"""Hostile shelves: forged safetensors headers, poisoned values, bad configs and indexes, links
out of the folder, planted pickles, and fuzzed bytes. Each is refused with a clear error before
the model changes; nothing is executed and nothing outside the shelf is read."""

from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from halrp_adapt.files.storage import (CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, read_index,
                                 read_task_config, read_tensors)

from conftest import load_fails


def _split(blob: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + length]), blob[8 + length:]


def _join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _forge(shelf, task: str, change) -> None:
    """Rewrite the raw safetensors header of `task`'s file with `change(header, data)`."""
    path = shelf / task / WEIGHTS_NAME
    header, data = _split(path.read_bytes())
    result = change(header, data)
    path.write_bytes(result if isinstance(result, bytes) else _join(header, data))


def _tensor_keys(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"),
                  key=lambda k: header[k]["data_offsets"][0])


def test_header_claiming_a_huge_tensor(shelf):
    def huge(header, data):
        key = _tensor_keys(header)[-1]
        start = header[key]["data_offsets"][0]
        header[key].update(shape=[1 << 20, 1 << 20], data_offsets=[start, start + (4 << 40)])
    _forge(shelf, "a", huge)
    load_fails(shelf, "not a readable safetensors file")


def test_header_length_field_larger_than_the_file(shelf):
    _forge(shelf, "a", lambda header, data: struct.pack("<Q", 1 << 60) + b"{}" + data)
    load_fails(shelf, "not a readable safetensors file")


def test_overlapping_offsets(shelf):
    def overlap(header, data):
        first, second = _tensor_keys(header)[:2]
        a, b = header[first]["data_offsets"]
        header[second]["data_offsets"] = [a, a + (header[second]["data_offsets"][1]
                                                  - header[second]["data_offsets"][0])]
    _forge(shelf, "a", overlap)
    load_fails(shelf, "not a readable safetensors file")


def test_unknown_dtype_in_the_header(shelf):
    def unknown(header, data):
        header[_tensor_keys(header)[0]]["dtype"] = "Q8"
    _forge(shelf, "a", unknown)
    load_fails(shelf, "not a readable safetensors file")


def _rewrite(shelf, task: str, change) -> None:
    from safetensors.torch import load_file, save_file

    path = shelf / task / WEIGHTS_NAME
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def test_tensor_of_another_dtype(shelf):
    def to_int(t):
        key = next(k for k in t if k.endswith("halrp_s"))
        t[key] = t[key].to(torch.int64)
    _rewrite(shelf, "a", to_int)
    load_fails(shelf, r"halrp_s has dtype torch.int64, the model expects")


def test_tensor_with_infinity(shelf):
    def poison(t):
        key = next(k for k in t if k.endswith("halrp_head.weight"))
        t[key][0, 0] = float("-inf")
    _rewrite(shelf, "b", poison)
    load_fails(shelf, "holds NaN or infinite values")


def test_missing_tensor(shelf):
    def drop(t):
        del t[next(k for k in t if k.endswith("halrp_r"))]
    _rewrite(shelf, "a", drop)
    load_fails(shelf, r"tensors do not match the task's layers: missing \[")


def _edit_json(path, change) -> None:
    data = json.loads(path.read_text())
    result = change(data)
    path.write_text(json.dumps(data if result is None else result))


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(rank_pattern=[1, 2]), "`rank_pattern` must be a dict, got list"),
    (lambda d: d.update(num_classes="3"), "`num_classes` must be null or an int >= 1"),
    (lambda d: d.update(rank_pattern={"0": -1}), r"`rank_pattern\['0'\]` must be an int >= 0"),
    (lambda d: d.update(evil="os.system('x')"), r"unknown fields \['evil'\]; allowed: \["),
    (lambda d: d.update(peft_type="LORA"), "`peft_type` must be 'HALRP', got 'LORA'"),
    (lambda d: d.update(budget="all"), "budget"),
    (lambda d: [d], "must be a JSON object, got list"),
])
def test_bad_task_config(shelf, change, message):
    _edit_json(shelf / "a" / CONFIG_NAME, change)
    load_fails(shelf, message)


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(tasks="a"), "`tasks` must be a list of distinct task names"),
    (lambda d: d.update(tasks=["a", "a"]), "`tasks` must be a list of distinct task names"),
    (lambda d: d["backbone"].update(params="many"), "`backbone` must hold `class` \\(str\\)"),
    (lambda d: d.update(options=[]), "`options` must be a JSON object"),
    (lambda d: d.update(base_weights="../../etc/passwd"), "`base_weights` must be null or"),
    (lambda d: d.update(task_info=3), "`task_info` must be a JSON object"),
])
def test_bad_index(shelf, change, message):
    _edit_json(shelf / INDEX_NAME, change)
    load_fails(shelf, message)


def test_oversized_config_is_not_read(shelf):
    path = shelf / "a" / CONFIG_NAME
    with open(path, "r+b") as f:
        f.truncate(17 << 20)  # sparse: no disk spent
    load_fails(shelf, "is larger than")


def test_task_folder_linked_outside_the_shelf(shelf, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    os.rename(shelf / "b", outside / "b")
    os.symlink(outside / "b", shelf / "b", target_is_directory=True)
    load_fails(shelf, "points outside .* refusing to use it")


def test_index_linked_outside_the_shelf(shelf, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    os.rename(shelf / INDEX_NAME, outside / INDEX_NAME)
    os.symlink(outside / INDEX_NAME, shelf / INDEX_NAME)
    load_fails(shelf, "points outside .* refusing to use it")


class _Bomb:
    """Unpickling this writes a marker file: the proof that a pickle was executed."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_is_never_executed(shelf, tmp_path_factory):
    marker = tmp_path_factory.mktemp("marker") / "executed"
    for name in ("adapter_model.bin", "pytorch_model.bin"):
        (shelf / "a" / name).write_bytes(pickle.dumps(_Bomb(str(marker))))
    (shelf / "a" / WEIGHTS_NAME).unlink()
    load_fails(shelf, "tensor file not found", exc=FileNotFoundError)
    assert not marker.exists(), "a pickle in the shelf was executed"


# ---- fuzzing the readers: any bytes give a parsed value or a ValueError, nothing else -------
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _readers_refuse_cleanly(read) -> None:
    try:
        read()
    except (ValueError, FileNotFoundError):
        pass


@FUZZ
@given(blob=st.binary(max_size=600))
def test_fuzz_index_reader_with_bytes(tmp_path, blob):
    (tmp_path / INDEX_NAME).write_bytes(blob)
    _readers_refuse_cleanly(lambda: read_index(tmp_path))


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=12)


@FUZZ
@given(data=st.dictionaries(st.sampled_from(
    ["format_version", "tasks", "backbone", "options", "base_weights", "task_info", "x"]),
    JSON, max_size=7))
def test_fuzz_index_reader_with_json(tmp_path, data):
    (tmp_path / INDEX_NAME).write_text(json.dumps(data))
    _readers_refuse_cleanly(lambda: read_index(tmp_path))


@FUZZ
@given(blob=st.binary(max_size=600))
def test_fuzz_config_reader_with_bytes(tmp_path, blob):
    (tmp_path / "t").mkdir(exist_ok=True)
    (tmp_path / "t" / CONFIG_NAME).write_bytes(blob)
    _readers_refuse_cleanly(lambda: read_task_config(tmp_path, "t"))


@FUZZ
@given(data=st.dictionaries(st.sampled_from(
    ["peft_type", "budget", "rank_pattern", "sparse_pattern", "num_classes", "metrics",
     "target_modules", "explained", "svd", "trains_base", "format_version", "l1"]),
    JSON, max_size=8))
def test_fuzz_config_reader_with_json(tmp_path, data):
    (tmp_path / "t").mkdir(exist_ok=True)
    (tmp_path / "t" / CONFIG_NAME).write_text(json.dumps({"peft_type": "HALRP", **data}))
    _readers_refuse_cleanly(lambda: read_task_config(tmp_path, "t"))


@FUZZ
@given(blob=st.binary(max_size=400))
def test_fuzz_tensor_reader(tmp_path, blob):
    path = tmp_path / WEIGHTS_NAME
    path.write_bytes(blob)
    _readers_refuse_cleanly(lambda: read_tensors(path, tmp_path))
