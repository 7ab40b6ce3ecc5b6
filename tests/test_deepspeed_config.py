"""The ``"deepep_plugin"`` JSON section and ``apply``: what is read, what is refused, what changes in a model.

Single process, no communication: the layers are swapped but never run here (``test_deepspeed_layer.py`` runs
them).
"""

from __future__ import annotations

import base64
import json

import deepspeed_harness as h  # noqa: I001  (sets DS_ACCELERATOR before deepspeed is imported)
import pytest
import torch

pytest.importorskip("deepspeed", reason="deepspeed is installed by tools/ci_install_deepspeed.sh")

from deepspeed.moe.layer import MoE  # noqa: E402
from deepspeed.moe.sharded_moe import MOELayer  # noqa: E402

from deepep_plugin.errors import DeepEPInputError  # noqa: E402
from deepep_plugin.integrations import deepspeed as ep_ds  # noqa: E402

SECTION = {"enabled": True, "backend": "auto", "fp8_dispatch": False, "num_sms": 24}


class TwoMoEModel(torch.nn.Module):
    """Two DeepSpeed MoE layers between linear layers, as a real model nests them."""

    def __init__(self, hidden: int = 16, **moe_kwargs) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(hidden, hidden)
        self.blocks = torch.nn.ModuleList(
            [h.build_moe(hidden, 24, 4, 2, 2, seed, 0, **moe_kwargs) for seed in (1, 2)])
        self.out = torch.nn.Linear(hidden, 1)


def _ds_config(section) -> dict:
    return {"train_batch_size": 2, "deepep_plugin": section}


# ------------------------------------------------------------------------------------------------------------
# Reading the section
# ------------------------------------------------------------------------------------------------------------
def test_section_values_are_read() -> None:
    gl = {"num_groups": 2, "topk_group": 1, "score_function": "sigmoid", "routed_scaling_factor": 2.5,
          "normalize": True}
    opts = ep_ds.read_options(_ds_config({"enabled": True, "backend": "reference", "fp8_dispatch": True,
                                          "num_sms": 20, "group_limited_gating": gl}))
    assert opts == ep_ds.PluginOptions(True, "reference", True, 20, ep_ds.GroupLimitedGating(2, 1, "sigmoid", 2.5,
                                                                                             True))


def test_missing_section_or_config_means_disabled_with_defaults() -> None:
    assert ep_ds.read_options({"train_batch_size": 2}) == ep_ds.PluginOptions()
    assert ep_ds.read_options(None) == ep_ds.PluginOptions()
    assert ep_ds.PluginOptions() == ep_ds.PluginOptions(False, "auto", False, 24, None)


def test_config_is_read_from_a_json_file_and_from_base64(tmp_path) -> None:
    cfg = _ds_config(SECTION)
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(cfg))
    encoded = base64.urlsafe_b64encode(json.dumps(cfg).encode()).decode()
    want = ep_ds.read_options(cfg)
    assert want.enabled
    assert ep_ds.read_options(str(path)) == want
    assert ep_ds.read_options(path) == want
    assert ep_ds.read_options(encoded) == want


def test_the_section_is_ignored_by_deepspeeds_own_config_parser() -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    parsed = DeepSpeedConfig(_ds_config(SECTION))
    assert parsed._param_dict["deepep_plugin"] == SECTION


@pytest.mark.parametrize(
    "section, key",
    [
        ({"enabled": "yes"}, "deepep_plugin.enabled"),
        ({"enabled": True, "backend": "nccl"}, "deepep_plugin.backend"),
        ({"enabled": True, "fp8_dispatch": 1}, "deepep_plugin.fp8_dispatch"),
        ({"enabled": True, "num_sms": 23}, "deepep_plugin.num_sms"),
        ({"enabled": True, "num_sms": 0}, "deepep_plugin.num_sms"),
        ({"enabled": True, "num_sms": "24"}, "deepep_plugin.num_sms"),
        ({"enabled": True, "num_sm": 24}, "num_sm"),
        ({"enabled": True, "group_limited_gating": {"num_groups": 0}}, "group_limited_gating.num_groups"),
        ({"enabled": True, "group_limited_gating": {"num_groups": 2, "topk_group": 3}},
         "group_limited_gating.topk_group"),
        ({"enabled": True, "group_limited_gating": {"score_function": "relu"}}, "group_limited_gating.score_function"),
        ({"enabled": True, "group_limited_gating": {"routed_scaling_factor": -1}},
         "group_limited_gating.routed_scaling_factor"),
        ({"enabled": True, "group_limited_gating": {"groups": 2}}, "groups"),
        ([True], "deepep_plugin"),
    ],
)
def test_bad_value_raises_naming_the_key(section, key: str) -> None:
    with pytest.raises(DeepEPInputError, match=key.replace(".", r"\.")):
        ep_ds.read_options(_ds_config(section))


def test_unreadable_config_string_raises() -> None:
    with pytest.raises(DeepEPInputError, match="neither an existing file nor a base64"):
        ep_ds.read_options("/no/such/ds_config.json")


# ------------------------------------------------------------------------------------------------------------
# apply / restore
# ------------------------------------------------------------------------------------------------------------
def test_apply_swaps_every_moe_layer_and_keeps_state_keys_and_parameter_tags() -> None:
    model = TwoMoEModel()
    keys_before = list(model.state_dict())
    params_before = {n: (p, getattr(p, "allreduce", True), getattr(p, "group_name", None))
                     for n, p in model.named_parameters()}
    wrappers = [b for b in model.blocks]
    names = ep_ds.apply(model, _ds_config(SECTION))
    assert names == ["blocks.0.deepspeed_moe", "blocks.1.deepspeed_moe"]
    for block in model.blocks:
        assert type(block.deepspeed_moe) is ep_ds.DeepEPMOELayer
        assert isinstance(block.deepspeed_moe, MOELayer) and isinstance(block, MoE)
        assert block.deepspeed_moe.deepep_options == ep_ds.read_options(_ds_config(SECTION))
    assert [b for b in model.blocks] == wrappers
    assert list(model.state_dict()) == keys_before
    for n, p in model.named_parameters():
        ref, allreduce, group = params_before[n]
        assert p is ref and getattr(p, "allreduce", True) == allreduce and getattr(p, "group_name", None) == group
    assert {n for n, p in model.named_parameters() if getattr(p, "allreduce", True) is False} == {
        n for n in params_before if ".experts.deepspeed_experts." in n}


def test_apply_does_nothing_when_disabled() -> None:
    model = TwoMoEModel()
    assert ep_ds.apply(model, _ds_config({"enabled": False, "num_sms": 20})) == []
    assert ep_ds.apply(model, {"train_batch_size": 2}) == []
    assert all(type(b.deepspeed_moe) is MOELayer for b in model.blocks)


def test_restore_undoes_apply() -> None:
    model = TwoMoEModel()
    ep_ds.apply(model, _ds_config(SECTION))
    assert ep_ds.restore(model) == ["blocks.0.deepspeed_moe", "blocks.1.deepspeed_moe"]
    for block in model.blocks:
        assert type(block.deepspeed_moe) is MOELayer
        assert not hasattr(block.deepspeed_moe, "deepep_options")


def test_apply_twice_updates_the_options() -> None:
    model = TwoMoEModel()
    ep_ds.apply(model, _ds_config(SECTION))
    ep_ds.apply(model, _ds_config({"enabled": True, "num_sms": 8}))
    assert all(b.deepspeed_moe.deepep_options.num_sms == 8 for b in model.blocks)


def test_apply_refuses_expert_tensor_parallelism() -> None:
    model = TwoMoEModel(enable_expert_tensor_parallelism=True)
    with pytest.raises(ep_ds.UnsupportedSetupError, match="enable_expert_tensor_parallelism"):
        ep_ds.apply(model, _ds_config(SECTION))
    assert all(type(b.deepspeed_moe) is MOELayer for b in model.blocks)


def test_apply_refuses_tensor_parallel_mpu() -> None:
    with pytest.raises(ep_ds.UnsupportedSetupError, match="tensor parallel size 2"):
        ep_ds.apply(TwoMoEModel(), _ds_config(SECTION), mpu=_TensorParallelMPU())


def test_fp8_dispatch_needs_hidden_multiple_of_128() -> None:
    with pytest.raises(DeepEPInputError, match=r"fp8_dispatch.*hidden size 16"):
        ep_ds.apply(TwoMoEModel(hidden=16), _ds_config({"enabled": True, "fp8_dispatch": True}))
    assert len(ep_ds.apply(TwoMoEModel(hidden=128), _ds_config({"enabled": True, "fp8_dispatch": True}))) == 2


def test_group_limited_gating_must_fit_the_layer() -> None:
    # 4 experts: 3 groups do not divide them; 4 groups with 1 kept hold 1 expert, fewer than k = 2
    with pytest.raises(DeepEPInputError, match="num_groups = 3 must divide the number of experts"):
        ep_ds.apply(TwoMoEModel(), _ds_config({"enabled": True, "group_limited_gating": {"num_groups": 3}}))
    with pytest.raises(DeepEPInputError, match="k = 2 experts but topk_group = 1"):
        ep_ds.apply(TwoMoEModel(), _ds_config({"enabled": True, "group_limited_gating": {"num_groups": 4}}))


def test_apply_refuses_a_foreign_moelayer_subclass() -> None:
    class CustomLayer(MOELayer):
        def forward(self, *inputs, **kwargs):
            raise AssertionError("never called")

    model = TwoMoEModel()
    model.blocks[1].deepspeed_moe.__class__ = CustomLayer
    with pytest.raises(DeepEPInputError, match="CustomLayer"):
        ep_ds.apply(model, _ds_config(SECTION))


def test_forward_without_expert_parallel_group_raises() -> None:
    model = TwoMoEModel()
    ep_ds.apply(model, _ds_config(SECTION))
    with pytest.raises(DeepEPInputError, match="set_deepspeed_parallelism"):
        model.blocks[0](torch.randn(4, 16))


class _TensorParallelMPU:
    def get_tensor_model_parallel_world_size(self) -> int:
        return 2


def test_forward_refuses_tensor_parallelism_set_up_by_the_engine(monkeypatch) -> None:
    """``deepspeed.initialize(mpu=...)`` stores the mpu in ``deepspeed.utils.groups``: the layer checks it."""
    from deepspeed.utils import groups

    monkeypatch.setattr(groups, "mpu", _TensorParallelMPU())
    with pytest.raises(ep_ds.UnsupportedSetupError, match="tensor parallel size 2"):
        ep_ds.layer.check_parallelism()


def test_forward_refuses_expert_tensor_parallelism(monkeypatch) -> None:
    from deepspeed.utils import groups

    monkeypatch.setattr(groups, "expert_tensor_parallel_world_size", 2)
    with pytest.raises(ep_ds.UnsupportedSetupError, match="expert tensor parallelism"):
        ep_ds.layer.check_parallelism()


@pytest.mark.parametrize("how", ["config", "config_params", "args.deepspeed_config", "positional"])
def test_initialize_swaps_then_calls_deepspeed_initialize_with_the_same_arguments(how, tmp_path, monkeypatch) -> None:
    import argparse
    import inspect

    import deepspeed

    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(_ds_config(SECTION)))
    calls = []
    real = deepspeed.initialize

    def fake_initialize(*args, **kwargs):
        calls.append((args, kwargs))
        return "engine", "optimizer", None, None

    fake_initialize.__signature__ = inspect.signature(real)
    monkeypatch.setattr(deepspeed, "initialize", fake_initialize)
    model = TwoMoEModel()
    cli = argparse.Namespace(deepspeed_config=str(path), local_rank=0)
    call = {
        "config": ((), dict(model=model, config=str(path))),
        "config_params": ((), dict(model=model, config_params=_ds_config(SECTION))),
        "args.deepspeed_config": ((), dict(args=cli, model=model)),
        "positional": ((cli, model), {}),
    }[how]
    assert ep_ds.initialize(*call[0], **call[1]) == ("engine", "optimizer", None, None)
    assert calls == [call]
    assert all(type(b.deepspeed_moe) is ep_ds.DeepEPMOELayer for b in model.blocks)
