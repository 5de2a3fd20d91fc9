"""PEFT's generic tuner tests (PEFT's own files, see tests/peft_suite.py) on HALRP rows.

The rows follow PEFT's tables: tiny custom models from PEFT's `test_custom_models.py` (MLP,
MLP with LayerNorm, Conv2d, an embedding + transformers Conv1D), with the classifier as each
task's own head or shared, and tiny Llama and GPT-2 causal LMs built from a config. Every
selected PEFT test passes or is skipped with the reason HALRP differs on purpose.
"""

from __future__ import annotations

import pytest

import peft_suite
from halrp_adapt import HalrpConfig

suite = peft_suite.load()
common, custom, decoder = suite.common, suite.custom, suite.decoder

# Budgets are large because PEFT's models are tiny: a task's fixed cost (scales, biases, norm
# copies) of a 10 -> 20 Linear is already a fifth of it.
CUSTOM_CASES = [
    ("MLP own head", "MLP", HalrpConfig, {"target_modules": ["lin0"], "budget": 0.9}),
    ("MLP shared head", "MLP", HalrpConfig, {"target_modules": ["lin0"], "task_heads": False,
                                             "budget": 0.9}),
    ("MLP regex", "MLP", HalrpConfig, {"target_modules": "lin0", "budget": 0.9}),
    ("MLP LayerNorm", "MLP_LayerNorm", HalrpConfig, {"target_modules": ["lin0"], "budget": 0.9}),
    ("Conv2d", "Conv2d", HalrpConfig, {"target_modules": ["conv2d"], "budget": 0.9}),
    ("Conv2d shared head", "Conv2d", HalrpConfig, {"task_heads": False, "budget": 0.9}),
    ("EmbConv1D", "EmbConv1D", HalrpConfig, {"target_modules": ["conv1d"], "budget": 0.9}),
]
DECODER_MODELS = [
    "halrp-testing/tiny-LlamaForCausalLM",  # untied lm_head: each task its own head
    "halrp-testing/tiny-gpt2",  # lm_head tied to the embeddings: one shared head
]
DECODER_CONFIGS = [
    (HalrpConfig, {"task_type": "CAUSAL_LM", "target_modules": None, "budget": 0.5}),
]

# Tests that check what HALRP refuses on purpose; each refusal is a clear error that names the
# call to make instead (tests/test_peft_api.py checks them).
NOT_IN_PLACE = (
    "HALRP merges a task into a plain model (merge_and_unload) but never in place: the frozen "
    "W0 is shared by every task, so merge_adapter/unmerge_adapter are refused"
)
NOT_ADDITIVE = (
    "HALRP tasks are not additive (each has its own scales, factors, norms and head), so "
    "set_adapter([a, b]) is refused; mixed batches (adapter_names=) run each sample through one"
)
OWN_CONFIG_COPY = (
    "each HALRP adapter keeps its own copy of its config (it records the task's ranks), so "
    "peft_config[name] is equal to, not the same object as, the config passed in"
)
CUSTOM_DIFFERENCES = {"test_from_pretrained_config_construction": OWN_CONFIG_COPY}
DECODER_DIFFERENCES = {"test_from_pretrained_config_construction": OWN_CONFIG_COPY}


@pytest.fixture(autouse=True)
def _refusals_skip_at_the_call(monkeypatch):
    peft_suite.refusals_become_skips(monkeypatch, NOT_IN_PLACE, NOT_ADDITIVE)


def _ids(rows):
    return [row[0] for row in rows]


class TestHalrpCustomModels(common.PeftCommonTester):
    transformers_class = custom.MockTransformerWrapper
    prepare_inputs_for_testing = custom.TestPeftCustomModel.prepare_inputs_for_testing


for _name, _method in peft_suite.skip_differences(
    peft_suite.reparametrize(
        custom.TestPeftCustomModel, {id(custom.TEST_CASES): (CUSTOM_CASES, _ids(CUSTOM_CASES))}
    ),
    CUSTOM_DIFFERENCES,
).items():
    setattr(TestHalrpCustomModels, _name, _method)


class TestHalrpDecoderModels(common.PeftCommonTester):
    transformers_class = peft_suite.TinyCausalLM
    prepare_inputs_for_testing = decoder.TestDecoderModels.prepare_inputs_for_testing


for _name, _method in peft_suite.skip_differences(
    peft_suite.reparametrize(
        decoder.TestDecoderModels,
        {
            id(decoder.PEFT_DECODER_MODELS_TO_TEST): (DECODER_MODELS, DECODER_MODELS),
            id(decoder.ALL_CONFIGS): (DECODER_CONFIGS, ["HALRP"]),
        },
    ),
    DECODER_DIFFERENCES,
).items():
    setattr(TestHalrpDecoderModels, _name, _method)


# PEFT's decoder tests skip mixed-batch tests for every method but LoRA by name, in the test
# method itself; these run PEFT's own helpers on HALRP rows (adapters made non-identity, as
# `set_init_weights_false` does for the other tests).
MIXED = {"task_type": "CAUSAL_LM", "target_modules": None, "budget": 0.5, "init_weights": False}


@pytest.mark.parametrize("model_id", DECODER_MODELS)
def test_mixed_adapter_batches_in_forward_and_generate(model_id):
    tester = TestHalrpDecoderModels()
    with peft_suite.as_mixed_batch_method(common, HalrpConfig):
        tester._test_mixed_adapter_batches(model_id, HalrpConfig, dict(MIXED))


@pytest.mark.parametrize("model_id", DECODER_MODELS)
def test_generate_with_mixed_adapter_batches_and_beam_search(model_id):
    tester = TestHalrpDecoderModels()
    with peft_suite.as_mixed_batch_method(common, HalrpConfig):
        tester._test_generate_with_mixed_adapter_batches_and_beam_search(
            model_id, HalrpConfig, dict(MIXED)
        )


# PEFT's `check_beft_config` skips every non-BEFT config on Llama rows (it tests `isinstance`
# of a class); these run the two helpers it skips on HALRP's Llama.
LLAMA = DECODER_MODELS[0]


@pytest.mark.parametrize("helper", ["_test_merge_layers_nan", "_test_merge_layers_fp16"])
def test_merge_helpers_on_llama(helper):
    config_kwargs = suite.utils.set_init_weights_false(HalrpConfig, dict(DECODER_CONFIGS[0][1]))
    getattr(TestHalrpDecoderModels(), helper)(LLAMA, HalrpConfig, config_kwargs)


def test_the_suite_is_peft_s_own_files_at_the_installed_version():
    from importlib.metadata import version

    recorded = peft_suite.source()
    assert recorded["version"] == version("peft")
    assert len(recorded["sha256"]) == 64
    assert TestHalrpCustomModels.test_save_pretrained.__code__ is (
        custom.TestPeftCustomModel.test_save_pretrained.__code__
    )
