"""Megatron-Core integration: run MoE token dispatch on deepep_plugin, without forking or editing Megatron.

Two modes, both selected by Megatron's stock flags ``--moe-token-dispatcher-type flex
--moe-flex-dispatcher-backend deepep`` plus this package's ``--deepep-plugin`` flags:

* ``compat`` (:mod:`.compat`): Megatron's own DeepEP code path (``fused_a2a``) runs on ``deepep_plugin.Buffer``;
  no ``deep_ep`` needs to be installed, and an installed one is not shadowed.
* ``dispatcher`` (:mod:`.dispatcher`, the default): deepep_plugin's ``MoETokenDispatcher`` replaces the flex
  dispatcher and adds FP8 dispatch, padding per expert, device-side ``tokens_per_expert`` and group-layout checks.

Usage in a Megatron-LM training script::

    from deepep_plugin.integrations import megatron as dp_megatron

    pretrain(..., extra_args_provider=dp_megatron.add_megatron_args)   # adds --deepep-plugin, ...
    # in model_provider, before the model is built:
    dp_megatron.enable(get_args())

Megatron-Core users without Megatron-LM's argument parser call ``enable(transformer_config, mode=...)`` or
``enable("config.yaml")``.
"""

from __future__ import annotations

from typing import Any

from .binding import active_settings, disable, enable
from .settings import MODES, TOKENS_PER_EXPERT_DEVICES, PluginSettings, add_megatron_args
from .version import MAX_MEGATRON_CORE_EXCLUSIVE, MIN_MEGATRON_CORE, MegatronVersionError

__all__ = [
    "MAX_MEGATRON_CORE_EXCLUSIVE",
    "MIN_MEGATRON_CORE",
    "MODES",
    "TOKENS_PER_EXPERT_DEVICES",
    "DeepEPPluginTokenDispatcher",
    "MegatronVersionError",
    "PluginSettings",
    "active_settings",
    "add_megatron_args",
    "disable",
    "enable",
]


def __getattr__(name: str) -> Any:
    # The dispatcher class subclasses Megatron's, so it is imported (with the version check) only when asked for.
    if name == "DeepEPPluginTokenDispatcher":
        from .version import megatron_core

        megatron_core()
        from .dispatcher import DeepEPPluginTokenDispatcher

        return DeepEPPluginTokenDispatcher
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
