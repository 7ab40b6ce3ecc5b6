"""``enable``/``disable``: bind (and unbind) Megatron-Core's flex token dispatch to deepep_plugin.

``enable`` must run after ``import megatron.core`` (any time; it imports it itself) and before the MoE layers are
built, e.g. at the top of a training script's ``model_provider``. It never edits Megatron's files and never creates
a ``deep_ep`` module: it rebinds names in Megatron's modules, and ``disable`` puts the previous ones back.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from .settings import PluginSettings, check_against_megatron, settings_from
from .version import megatron_core

logger = logging.getLogger(__name__)

_restore: Optional[Callable[[], None]] = None
_active: Optional[PluginSettings] = None


def enable(args_or_config: Any = None, **overrides: Any) -> PluginSettings:
    """Apply the plugin settings found in ``args_or_config``; returns the settings applied.

    Args:
        args_or_config: parsed Megatron-LM ``args`` (with the flags of ``add_megatron_args``), a
            ``TransformerConfig`` (plugin defaults, checked against its MoE fields), a mapping or a path to a YAML
            file (flat ``deepep_plugin_*`` keys or a nested ``deepep_plugin`` section), or ``None`` (defaults).
        **overrides: settings fields (``mode``, ``fp8_dispatch``, ``num_sms``, ``expert_alignment``,
            ``tokens_per_expert_device``, ``enabled``) that replace the source's values.

    When the source has ``deepep_plugin`` false (the flag not given), nothing is bound and the disabled settings
    are returned, so scripts may call ``enable(args)`` unconditionally. Calling it again replaces the previous
    binding.

    Raises:
        DeepEPInputError: an unknown setting or value, or settings that contradict Megatron's (e.g.
            ``--deepep-plugin`` with ``--moe-token-dispatcher-type alltoall``, or ``fp8_dispatch`` in compat mode).
        MegatronVersionError: megatron-core is missing or of an unsupported version.
    """
    settings, megatron_values = settings_from(args_or_config)
    if overrides:
        import dataclasses

        unknown = sorted(set(overrides) - set(PluginSettings.field_names()))
        if unknown:
            from deepep_plugin.errors import DeepEPInputError

            raise DeepEPInputError(f"deepep_plugin.enable: unknown setting(s) {unknown}; known: "
                                   f"{list(PluginSettings.field_names())}")
        settings = dataclasses.replace(settings, **overrides)
    check_against_megatron(settings, megatron_values, what=_describe(args_or_config))
    disable()
    if not settings.enabled:
        return settings
    megatron_core()
    global _restore, _active
    if settings.mode == "compat":
        from . import compat

        _restore = compat.bind(settings)
    else:
        from megatron.core.transformer.moe import moe_layer

        from . import dispatcher

        previous = moe_layer.MoEFlexTokenDispatcher
        dispatcher.set_active_settings(settings)
        dispatcher._MEGATRON_FLEX = previous  # other flex backends (hybridep, ncclep) keep Megatron's dispatcher
        moe_layer.MoEFlexTokenDispatcher = dispatcher.DeepEPPluginTokenDispatcher

        def restore() -> None:
            moe_layer.MoEFlexTokenDispatcher = previous
            dispatcher._MEGATRON_FLEX = None
            dispatcher.set_active_settings(None)
            dispatcher.BUFFERS.clear()

        _restore = restore
    _active = settings
    logger.info("deepep_plugin: Megatron MoE flex dispatch bound to deepep_plugin (%s)", settings)
    return settings


def disable() -> None:
    """Undo ``enable``: Megatron's own bindings come back (for layers built afterwards). No-op when not enabled."""
    global _restore, _active
    if _restore is not None:
        _restore()
    _restore, _active = None, None


def active_settings() -> Optional[PluginSettings]:
    """The settings of the current binding, or ``None`` when the plugin is not enabled."""
    return _active


def _describe(source: Any) -> str:
    if source is None:
        return "the defaults"
    if isinstance(source, str):
        return repr(source)
    return type(source).__name__
