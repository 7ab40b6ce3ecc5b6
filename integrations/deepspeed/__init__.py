"""DeepSpeed integration: run ``deepspeed.moe.layer.MoE`` layers on deepep_plugin's dispatch/combine.

Enable it from the DeepSpeed JSON config and one call::

    "deepep_plugin": {"enabled": true, "backend": "auto", "fp8_dispatch": false, "num_sms": 24}

    from deepep_plugin.integrations import deepspeed as ep_ds
    engine, optimizer, _, _ = ep_ds.initialize(model=model, model_parameters=params, config="ds_config.json")

Modules: ``config`` (the JSON section), ``gating`` (capacity-free routing with DeepSpeed's ``l_aux``),
``buffers`` (one ``Buffer`` per EP group), ``layer`` (``DeepEPMOELayer``), ``install`` (``apply``,
``restore``, ``initialize``).
"""

try:
    import deepspeed  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "deepep_plugin.integrations.deepspeed needs DeepSpeed: pip install deepspeed (on a CPU-only machine, install "
        "the CPU build of torch first; tools/ci_install_deepspeed.sh does both safely)"
    ) from e

from .config import SECTION, PluginOptions, load_ds_config, parse_section, read_options
from .gating import GroupLimitedGating, Routing, route
from .install import apply, initialize, restore
from .layer import DeepEPMOELayer, UnsupportedSetupError

__all__ = [
    "SECTION",
    "DeepEPMOELayer",
    "GroupLimitedGating",
    "PluginOptions",
    "Routing",
    "UnsupportedSetupError",
    "apply",
    "initialize",
    "load_ds_config",
    "parse_section",
    "read_options",
    "restore",
    "route",
]
