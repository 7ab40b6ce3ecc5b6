"""The Megatron flag and config surface of deepep_plugin.integrations.megatron: parsing, checks, binding, unbinding.

These run in the test process (no process group is needed to bind or to check settings); every test that binds
calls ``disable()`` so Megatron's module globals are left as found.
"""

from __future__ import annotations

import argparse
import sys

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is installed by tools/ci_install_megatron.sh")

import megatron.core  # noqa: E402
from megatron.core.transformer.moe import fused_a2a, moe_layer, token_dispatcher  # noqa: E402

import deepep_plugin  # noqa: E402
from deepep_plugin.errors import DeepEPInputError  # noqa: E402
from deepep_plugin.integrations import megatron as dpm  # noqa: E402
from deepep_plugin.integrations.megatron.dispatcher import routing_map_to_topk  # noqa: E402

STOCK_FLEX = ["--moe-token-dispatcher-type", "flex", "--moe-flex-dispatcher-backend", "deepep"]


def _megatron_like_parser() -> argparse.ArgumentParser:
    """The Megatron-LM flags the plugin checks against, as Megatron-LM 0.16 spells them, plus the plugin's."""
    p = argparse.ArgumentParser()
    p.add_argument("--moe-token-dispatcher-type", choices=["allgather", "alltoall", "flex"], default="allgather")
    p.add_argument("--moe-flex-dispatcher-backend", choices=["deepep", "hybridep"], default="deepep")
    p.add_argument("--moe-deepep-num-sms", type=int, default=20)
    p.add_argument("--hidden-size", type=int, default=256)
    return dpm.add_megatron_args(p)


def _parse(*argv: str) -> argparse.Namespace:
    return _megatron_like_parser().parse_args(list(argv))


@pytest.fixture(autouse=True)
def _unbind():
    sms = deepep_plugin.Buffer.num_sms
    yield
    dpm.disable()
    deepep_plugin.Buffer.num_sms = sms


def test_flags_parse_into_settings() -> None:
    args = _parse(*STOCK_FLEX, "--deepep-plugin", "--deepep-plugin-mode", "dispatcher", "--deepep-plugin-fp8-dispatch",
                  "--deepep-plugin-num-sms", "24", "--deepep-plugin-expert-alignment", "16")
    settings = dpm.enable(args)
    assert settings == dpm.PluginSettings(enabled=True, mode="dispatcher", fp8_dispatch=True, num_sms=24,
                                          expert_alignment=16)


def test_without_the_flag_nothing_is_bound() -> None:
    before = moe_layer.MoEFlexTokenDispatcher
    settings = dpm.enable(_parse(*STOCK_FLEX))
    assert not settings.enabled
    assert moe_layer.MoEFlexTokenDispatcher is before and dpm.active_settings() is None


def test_dispatcher_mode_binds_the_flex_dispatcher_class_and_disable_restores_it() -> None:
    before = moe_layer.MoEFlexTokenDispatcher
    dpm.enable(_parse(*STOCK_FLEX, "--deepep-plugin"))
    assert moe_layer.MoEFlexTokenDispatcher is dpm.DeepEPPluginTokenDispatcher
    assert issubclass(dpm.DeepEPPluginTokenDispatcher, token_dispatcher.MoETokenDispatcher)
    dpm.disable()
    assert moe_layer.MoEFlexTokenDispatcher is before


def test_compat_mode_binds_megatron_fused_a2a_without_a_deep_ep_module() -> None:
    before = {n: getattr(token_dispatcher, n) for n in ("fused_dispatch", "fused_combine", "set_deepep_num_sms")}
    dpm.enable(_parse(*STOCK_FLEX, "--deepep-plugin", "--deepep-plugin-mode", "compat"))
    assert fused_a2a.Buffer is deepep_plugin.Buffer and fused_a2a.EventOverlap is deepep_plugin.EventOverlap
    assert fused_a2a.HAVE_DEEP_EP is True
    for name in before:
        assert callable(getattr(token_dispatcher, name)) and getattr(token_dispatcher, name) is getattr(fused_a2a, name)
    assert "deep_ep" not in sys.modules
    dpm.disable()
    assert {n: getattr(token_dispatcher, n) for n in before} == before
    assert not hasattr(fused_a2a, "Buffer") or fused_a2a.Buffer is not deepep_plugin.Buffer


def test_compat_mode_plugin_num_sms_overrides_megatrons() -> None:
    dpm.enable(_parse(*STOCK_FLEX, "--deepep-plugin", "--deepep-plugin-mode", "compat", "--deepep-plugin-num-sms",
                      "24"))
    token_dispatcher.set_deepep_num_sms(20)  # what _DeepepManager does with config.moe_deepep_num_sms
    assert deepep_plugin.Buffer.num_sms == 24


@pytest.mark.parametrize("argv, message", [
    (["--moe-token-dispatcher-type", "alltoall", "--deepep-plugin"], "moe-token-dispatcher-type flex"),
    (["--moe-token-dispatcher-type", "flex", "--moe-flex-dispatcher-backend", "hybridep", "--deepep-plugin"],
     "moe_flex_dispatcher_backend='hybridep'"),
    ([*STOCK_FLEX, "--deepep-plugin", "--deepep-plugin-mode", "compat", "--deepep-plugin-fp8-dispatch"],
     "fp8_dispatch needs mode 'dispatcher'"),
    ([*STOCK_FLEX, "--deepep-plugin", "--deepep-plugin-num-sms", "23"], "positive even int"),
    ([*STOCK_FLEX, "--deepep-plugin", "--deepep-plugin-num-sms", "24", "--moe-deepep-num-sms", "32"],
     "conflicts with moe_deepep_num_sms=32"),
    ([*STOCK_FLEX, "--deepep-plugin", "--deepep-plugin-fp8-dispatch", "--hidden-size", "200"], "multiple of 128"),
    ([*STOCK_FLEX, "--deepep-plugin", "--deepep-plugin-expert-alignment", "0"], "expert_alignment"),
    ([*STOCK_FLEX, "--deepep-plugin", "--deepep-plugin-mode", "compat", "--deepep-plugin-expert-alignment", "16"],
     "expert_alignment needs mode 'dispatcher'"),
])
def test_conflicting_or_bad_values_are_refused_before_anything_is_bound(argv: list, message: str) -> None:
    before = moe_layer.MoEFlexTokenDispatcher
    with pytest.raises(DeepEPInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        dpm.enable(_parse(*argv))
    assert moe_layer.MoEFlexTokenDispatcher is before and dpm.active_settings() is None


def test_unknown_mode_is_refused_by_the_parser_and_by_enable() -> None:
    with pytest.raises(SystemExit):
        _megatron_like_parser().parse_args(["--deepep-plugin-mode", "turbo"])
    with pytest.raises(DeepEPInputError, match="'mode' must be one of"):
        dpm.enable(None, mode="turbo")


def test_unknown_setting_names_are_refused() -> None:
    with pytest.raises(DeepEPInputError, match="unknown setting 'deepep_plugin_fp8'"):
        dpm.enable({"deepep_plugin": True, "deepep_plugin_fp8": True})
    with pytest.raises(DeepEPInputError, match=r"unknown setting\(s\) \['sms'\]"):
        dpm.enable({"deepep_plugin": {"enabled": True, "sms": 8}})
    with pytest.raises(DeepEPInputError, match=r"unknown setting\(s\) \['fp8'\]"):
        dpm.enable(None, fp8=True)


def test_yaml_nested_and_flat_forms_give_the_same_settings(tmp_path) -> None:
    nested = tmp_path / "nested.yaml"
    nested.write_text("moe_token_dispatcher_type: flex\n"
                      "deepep_plugin:\n  enabled: true\n  mode: compat\n  num_sms: 16\n")
    flat = tmp_path / "flat.yaml"
    flat.write_text("moe_token_dispatcher_type: flex\ndeepep_plugin: true\ndeepep_plugin_mode: compat\n"
                    "deepep_plugin_num_sms: 16\n")
    want = dpm.PluginSettings(mode="compat", num_sms=16)
    assert dpm.enable(str(nested)) == want
    assert dpm.enable(flat) == want
    assert fused_a2a.Buffer is deepep_plugin.Buffer


def test_yaml_with_the_wrong_dispatcher_type_is_refused(tmp_path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("moe_token_dispatcher_type: allgather\ndeepep_plugin:\n  enabled: true\n")
    with pytest.raises(DeepEPInputError, match="moe_token_dispatcher_type='allgather'"):
        dpm.enable(cfg)


def test_transformer_config_is_checked_and_keywords_choose_the_settings() -> None:
    from megatron.core.transformer.transformer_config import TransformerConfig

    common = dict(num_layers=1, hidden_size=128, num_attention_heads=4, num_moe_experts=8, moe_router_topk=2,
                  use_cpu_initialization=True, add_bias_linear=False)
    flex = TransformerConfig(moe_token_dispatcher_type="flex", **common)
    assert dpm.enable(flex, fp8_dispatch=True) == dpm.PluginSettings(fp8_dispatch=True)
    alltoall = TransformerConfig(moe_token_dispatcher_type="alltoall", **common)
    with pytest.raises(DeepEPInputError, match="moe_token_dispatcher_type='alltoall'"):
        dpm.enable(alltoall)


@pytest.mark.parametrize("version", ["0.12.1", "0.21.0", "1.0.0"])
def test_unsupported_megatron_versions_are_refused(monkeypatch, version: str) -> None:
    monkeypatch.setattr(megatron.core, "__version__", version)
    with pytest.raises(dpm.MegatronVersionError, match=f"found {version}"):
        dpm.enable(None)


def test_routing_map_to_topk_lists_selected_experts_in_order_then_minus_one() -> None:
    g = torch.Generator().manual_seed(0)
    num_tokens, num_experts, topk = 9, 8, 3
    routing_map = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    for t in range(num_tokens):  # 0..topk experts per token (fewer when a capacity factor dropped some)
        chosen = torch.randperm(num_experts, generator=g)[: t % (topk + 1)]
        routing_map[t, chosen] = True
    probs = torch.rand(num_tokens, num_experts, generator=g) * routing_map
    idx, weights = routing_map_to_topk(routing_map, probs, topk)
    for t in range(num_tokens):
        experts = sorted(routing_map[t].nonzero().flatten().tolist())
        want_idx = experts + [-1] * (topk - len(experts))
        want_w = [float(probs[t, e]) for e in experts] + [0.0] * (topk - len(experts))
        assert idx[t].tolist() == want_idx
        assert weights[t].tolist() == want_w
    assert idx.dtype == torch.int64 and weights.dtype == torch.float32


def test_dispatcher_mode_leaves_megatrons_other_flex_backends_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """While the plugin is bound, a layer whose config asks for the hybridep or ncclep flex backend gets Megatron's
    own flex dispatcher (built with the same arguments); deepep gets the plugin's."""
    import types

    from deepep_plugin.integrations.megatron import dispatcher

    before = moe_layer.MoEFlexTokenDispatcher
    dpm.enable(_parse(*STOCK_FLEX, "--deepep-plugin"))
    try:
        assert dispatcher._MEGATRON_FLEX is before

        class Recorded:  # stands in for Megatron's dispatcher, whose real __init__ needs process groups
            def __init__(self, *args: object, config: object = None, **kwargs: object) -> None:
                self.args, self.config, self.kwargs = args, config, kwargs

        monkeypatch.setattr(dispatcher, "_MEGATRON_FLEX", Recorded)
        for backend in ("hybridep", "ncclep"):
            cfg = types.SimpleNamespace(moe_flex_dispatcher_backend=backend)
            built = moe_layer.MoEFlexTokenDispatcher(4, [0, 1, 2, 3], config=cfg, pg_collection="pg")
            assert type(built) is Recorded and built.args == (4, [0, 1, 2, 3]) and built.config is cfg
            assert built.kwargs == {"pg_collection": "pg"}
    finally:
        dpm.disable()
    assert dispatcher._MEGATRON_FLEX is None and moe_layer.MoEFlexTokenDispatcher is before


def test_sync_free_flags_reach_the_settings() -> None:
    settings = dpm.enable(_parse(*STOCK_FLEX, "--deepep-plugin", "--deepep-plugin-sync-free",
                                 "--deepep-plugin-worst-tokens", "512"))
    try:
        assert settings.sync_free and settings.worst_tokens == 512 and settings.mode == "dispatcher"
    finally:
        dpm.disable()


def test_sm_count_follows_megatron_fields_of_every_version() -> None:
    from types import SimpleNamespace

    from deepep_plugin.integrations.megatron.settings import MEGATRON_DEFAULT_DEEPEP_NUM_SMS, megatron_num_sms

    # 0.16: moe_deepep_num_sms defaults to 20; 0.17+: both fields default to None (Megatron then uses 20).
    assert megatron_num_sms(SimpleNamespace(moe_deepep_num_sms=20)) == 20
    assert megatron_num_sms(SimpleNamespace(moe_deepep_num_sms=None, moe_flex_dispatcher_num_sms=None)) == \
        MEGATRON_DEFAULT_DEEPEP_NUM_SMS
    assert megatron_num_sms(SimpleNamespace(moe_deepep_num_sms=24, moe_flex_dispatcher_num_sms=None)) == 24
    assert megatron_num_sms(SimpleNamespace(moe_deepep_num_sms=24, moe_flex_dispatcher_num_sms=16)) == 16
    assert megatron_num_sms(SimpleNamespace()) == MEGATRON_DEFAULT_DEEPEP_NUM_SMS
