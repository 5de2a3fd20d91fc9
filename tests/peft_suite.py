"""PEFT's own generic tests, loaded from PEFT's source distribution and pointed at HALRP rows.

`scripts/fetch_peft_suite.py` (run by `scripts/setup.sh`) puts PEFT's `tests/testing_common.py`,
`testing_utils.py`, `test_custom_models.py` and `test_decoder_models.py`, unchanged, at the
installed PEFT's exact version, in `.venv/peft-suite/peft-<version>/` (`SOURCE.json` there
records the sdist and its sha256). This module is the whole patch layer between those files and
HALRP; each patch says why:

1. The files are imported as the package `peft_suite_tests` (they use relative imports, and
   their own folder name, `tests`, is this project's).
2. `testing_common` imports `diffusers` for one Stable Diffusion test this suite never selects;
   without diffusers installed a stand-in module takes its place.
3. PEFT's test methods are copied with their bodies untouched and re-parametrized over HALRP's
   rows (`reparametrize`); methods PEFT parametrizes over other tables are not copied.
4. A test reaching a call HALRP refuses on purpose (merging in place, several adapters at once)
   is skipped at that call with the reason (`refusals_become_skips`): what the test checked
   before it still has to pass. A test that checks something else HALRP does differently is
   skipped up front with its reason (`skip_differences`). tests/test_peft_api.py checks the
   refusals' own errors.
5. PEFT's mixed-batch helpers skip every method but LoRA and RoAD by name; `as_mixed_batch_method`
   lets them run on HALRP for the duration of one call.
6. The decoder tests load Hub checkpoints by id; here the ids name tiny models built from a
   config, offline (`TinyCausalLM`).
7. `testing_common._skip_if_conv1d_not_supported` skips GPT-2 rows for every method but four
   by name; HALRP adapts transformers' Conv1D, so its rows are let through.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import types
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "peft_suite_tests"


def suite_dir() -> Path:
    base = Path(os.environ.get("HALRP_PEFT_SUITE_DIR", ROOT / ".venv" / "peft-suite"))
    return base / f"peft-{version('peft')}"


def source() -> dict[str, Any]:
    return json.loads((suite_dir() / "SOURCE.json").read_text(encoding="utf-8"))


def load() -> types.SimpleNamespace:
    """PEFT's test modules, or a skip (a failure with HALRP_REQUIRE_PEFT_SUITE=1) when absent."""
    folder = suite_dir() / "tests"
    if not (suite_dir() / "SOURCE.json").is_file():
        message = (
            f"PEFT {version('peft')}'s tests are not in {suite_dir()}: run "
            "`python scripts/fetch_peft_suite.py` (needs the package index)"
        )
        if os.environ.get("HALRP_REQUIRE_PEFT_SUITE") == "1":
            raise RuntimeError(message)
        pytest.skip(message, allow_module_level=True)
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(folder)]
        sys.modules[PACKAGE] = package
    try:
        importlib.import_module("diffusers")
    except ImportError:
        stand_in = types.ModuleType("diffusers")

        class StableDiffusionPipeline:  # never made: no selected test builds one
            pass

        stand_in.StableDiffusionPipeline = StableDiffusionPipeline  # type: ignore[attr-defined]
        sys.modules["diffusers"] = stand_in
    common = importlib.import_module(f"{PACKAGE}.testing_common")
    _let_conv1d_through(common)
    return types.SimpleNamespace(
        common=common,
        utils=importlib.import_module(f"{PACKAGE}.testing_utils"),
        custom=importlib.import_module(f"{PACKAGE}.test_custom_models"),
        decoder=importlib.import_module(f"{PACKAGE}.test_decoder_models"),
    )


def _let_conv1d_through(common: types.ModuleType) -> None:
    from halrp_adapt import HalrpConfig

    original = common._skip_if_conv1d_not_supported
    if getattr(original, "lets_halrp_through", False):
        return

    def skip_unless_halrp(model_id: str, config_cls: type, config_kwargs: dict) -> None:
        if not issubclass(config_cls, HalrpConfig):
            original(model_id, config_cls, config_kwargs)

    skip_unless_halrp.lets_halrp_through = True  # type: ignore[attr-defined]
    common._skip_if_conv1d_not_supported = skip_unless_halrp


def _copy_function(fn: types.FunctionType, marks: list[Any]) -> types.FunctionType:
    copied = types.FunctionType(
        fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )
    copied.__kwdefaults__ = fn.__kwdefaults__
    copied.__dict__.update({k: v for k, v in fn.__dict__.items() if k != "pytestmark"})
    copied.pytestmark = marks  # type: ignore[attr-defined]
    return copied


def reparametrize(
    source_cls: type, replacements: dict[int, tuple[list[Any], list[str]]]
) -> dict[str, types.FunctionType]:
    """PEFT's test methods of `source_cls` whose parametrization uses one of the tables in
    `replacements` (keyed by `id(table)`), each copied with that table swapped for
    `(rows, ids)`; the other parametrizations (dtypes, flags) are kept."""
    methods: dict[str, types.FunctionType] = {}
    for name, fn in vars(source_cls).items():
        if not name.startswith("test_") or not isinstance(fn, types.FunctionType):
            continue
        marks = list(getattr(fn, "pytestmark", []))
        swapped, new_marks = False, []
        for mark in marks:
            if mark.name == "parametrize" and id(mark.args[1]) in replacements:
                rows, ids = replacements[id(mark.args[1])]
                new_marks.append(pytest.mark.parametrize(mark.args[0], rows, ids=ids))
                swapped = True
            else:
                new_marks.append(mark)
        if swapped:
            methods[name] = _copy_function(fn, new_marks)
    return methods


def skip_differences(
    methods: dict[str, types.FunctionType], reasons: dict[str, str]
) -> dict[str, types.FunctionType]:
    """Mark each method named in `reasons` as skipped, with its reason."""
    unknown = sorted(set(reasons) - set(methods))
    if unknown:
        raise KeyError(f"LEGITIMATE_DIFFERENCES names tests that are not selected: {unknown}")
    for name, reason in reasons.items():
        methods[name].pytestmark = [*methods[name].pytestmark, pytest.mark.skip(reason=reason)]
    return methods


def refusals_become_skips(monkeypatch: pytest.MonkeyPatch, in_place: str, additive: str) -> None:
    """Make HALRP's deliberate refusals skip the running test, with the reason, at the call."""
    from halrp_adapt import HalrpTuner

    def merge_adapter(self: Any, *args: Any, **kwargs: Any) -> None:
        pytest.skip(in_place)

    set_adapter, merge_and_unload = HalrpTuner.set_adapter, HalrpTuner.merge_and_unload

    def set_one_adapter(self: Any, adapter_name: Any, *args: Any, **kwargs: Any) -> None:
        if not isinstance(adapter_name, str) and len(adapter_name) > 1:
            pytest.skip(additive)
        set_adapter(self, adapter_name, *args, **kwargs)

    def merge_one_and_unload(self: Any, *args: Any, adapter_names: Any = None, **kw: Any) -> Any:
        if adapter_names is not None and len(adapter_names) > 1:
            pytest.skip(additive)
        return merge_and_unload(self, *args, adapter_names=adapter_names, **kw)

    monkeypatch.setattr(HalrpTuner, "merge_adapter", merge_adapter)
    monkeypatch.setattr(HalrpTuner, "unmerge_adapter", merge_adapter)
    monkeypatch.setattr(HalrpTuner, "set_adapter", set_one_adapter)
    monkeypatch.setattr(HalrpTuner, "merge_and_unload", merge_one_and_unload)


@contextlib.contextmanager
def as_mixed_batch_method(common: types.ModuleType, config_cls: type) -> Iterator[None]:
    """PEFT's `_test_mixed_adapter_batches` and its beam-search sibling skip any config class
    but LoRA's (and RoAD's) by name; let `config_cls` through for one call."""
    saved = common.LoraConfig, common.RoadConfig
    common.RoadConfig = config_cls
    common.LoraConfig = config_cls
    try:
        yield
    finally:
        common.LoraConfig, common.RoadConfig = saved


class TinyCausalLM:
    """`from_pretrained(model_id)` for the decoder suite: tiny causal LMs built from a config,
    seeded, so the same id always gives the same weights (no Hub)."""

    @classmethod
    def config_for(cls, model_id: str) -> Any:
        import transformers

        small = dict(vocab_size=64, max_position_embeddings=32)
        if "llama" in model_id.lower():
            return transformers.LlamaConfig(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=False,
                **small,
            )
        if "gpt2" in model_id.lower():
            return transformers.GPT2Config(
                n_embd=16,
                n_layer=2,
                n_head=4,
                n_positions=32,
                vocab_size=64,
                tie_word_embeddings=True,
            )
        raise ValueError(f"no tiny causal LM is built for {model_id!r}")

    @classmethod
    def from_pretrained(cls, model_id: str, dtype: torch.dtype | None = None, **_: Any) -> Any:
        import transformers

        if os.path.isdir(model_id):  # a merged model saved by a test
            return transformers.AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype).eval()
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cls.config_for(model_id))
        model.config._name_or_path = model_id
        model.name_or_path = model_id
        model.eval()  # as from_pretrained returns it
        return model.to(dtype) if dtype is not None else model
