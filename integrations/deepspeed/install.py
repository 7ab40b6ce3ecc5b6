"""Turning the plugin on for a model: :func:`apply`, :func:`restore` and the drop-in :func:`initialize`.

DeepSpeed has no hook that runs plugin code from its config, so one call in user code does it::

    import integrations.deepspeed as ep_ds          # installed as deepep_plugin.integrations.deepspeed
    engine, optimizer, _, _ = ep_ds.initialize(model=model, model_parameters=params, config="ds_config.json")

which reads the ``"deepep_plugin"`` section of the config, swaps the MoE layers (:func:`apply`) and calls
``deepspeed.initialize`` with the same arguments. ``apply(model, config)`` alone does the swap (before or after
``deepspeed.initialize``). Only the class of each ``MOELayer`` instance changes: the ``MoE`` wrapper, its
``deepspeed_moe`` attribute, the gate, the ``Experts`` object, parameter tags (``allreduce``, ``group_name``), the
EP group and every ``state_dict`` key stay as they were, so ZeRO and MoE checkpoints work unchanged.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, List, Optional

import deepspeed
import torch
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import MOELayer

from deepep_plugin.errors import expect

from .config import SECTION, ConfigSource, PluginOptions, read_options
from .layer import DeepEPMOELayer, UnsupportedSetupError

logger = logging.getLogger(__name__)


def _check_layer(name: str, wrapper: Optional[MoE], layer: MOELayer, options: PluginOptions) -> None:
    where = f"MoE layer {name!r}"
    if wrapper is not None and getattr(wrapper, "enable_expert_tensor_parallelism", False):
        raise UnsupportedSetupError(
            f"{SECTION}: {where} was built with enable_expert_tensor_parallelism=True, which the plugin's MoE "
            f"layer does not support; build it without expert tensor parallelism or set {SECTION}.enabled = false"
        )
    num_experts = layer.ep_size * layer.num_local_experts
    hidden = layer.gate.wg.in_features
    if options.fp8_dispatch:
        expect(
            hidden % 128 == 0,
            f"{SECTION}.fp8_dispatch = true needs a hidden size that is a multiple of 128 (one FP8 scale per 128 "
            f"channels); {where} has hidden size {hidden}",
        )
    gl = options.group_limited_gating
    if gl is not None:
        expect(
            num_experts % gl.num_groups == 0,
            f"{SECTION}.group_limited_gating.num_groups = {gl.num_groups} must divide the number of experts "
            f"({num_experts}) of {where}",
        )
        available = gl.topk_group * (num_experts // gl.num_groups)
        expect(
            layer.gate.k <= available,
            f"{SECTION}.group_limited_gating: {where} routes to k = {layer.gate.k} experts but topk_group = "
            f"{gl.topk_group} groups hold only {available}",
        )


def apply(model: torch.nn.Module, config: ConfigSource = None, *, options: Optional[PluginOptions] = None,
          mpu: Any = None) -> List[str]:
    """Swap every DeepSpeed MoE layer of ``model`` for :class:`DeepEPMOELayer` if the config enables the plugin.

    Args:
        model: any module containing ``deepspeed.moe.layer.MoE`` layers (or bare ``MOELayer``s).
        config: the DeepSpeed config (dict, JSON path or base64 string) holding the ``"deepep_plugin"`` section.
        options: already parsed options (instead of ``config``).
        mpu: the model-parallel unit given to ``deepspeed.initialize``, if any (tensor parallelism is refused).

    Returns:
        Names (as in ``model.named_modules()``) of the ``MOELayer`` modules now running the plugin; ``[]`` when
        the plugin is disabled.

    Raises:
        DeepEPInputError: a bad value in the section (the message names the key), or an option the model
            cannot honour (e.g. FP8 with a hidden size not a multiple of 128).
        UnsupportedSetupError: expert or non-expert tensor parallelism.
    """
    expect(isinstance(model, torch.nn.Module), f"model must be a torch.nn.Module, got {type(model).__name__}")
    if options is None:
        options = read_options(config)
    if not options.enabled:
        return []
    if mpu is not None and hasattr(mpu, "get_tensor_model_parallel_world_size"):
        tp = mpu.get_tensor_model_parallel_world_size()
        if tp > 1:
            raise UnsupportedSetupError(
                f"{SECTION}: tensor-parallel non-expert layers (mpu tensor parallel size {tp}) are not supported "
                f"by the plugin's MoE layer; set {SECTION}.enabled = false or run without tensor parallelism"
            )
    wrappers = {id(m.deepspeed_moe): m for m in model.modules() if isinstance(m, MoE)}
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, MOELayer)]
    for name, layer in targets:
        expect(
            type(layer) in (MOELayer, DeepEPMOELayer),
            f"{SECTION}: MoE layer {name!r} is a {type(layer).__name__}, a subclass of DeepSpeed's MOELayer with "
            "its own forward; the plugin only replaces DeepSpeed's MOELayer",
        )
        _check_layer(name, wrappers.get(id(layer)), layer, options)
    for _, layer in targets:
        layer.__class__ = DeepEPMOELayer
        layer.deepep_options = options
    names = [name for name, _ in targets]
    if not names:
        logger.warning("%s.enabled is true but the model has no DeepSpeed MoE layer; nothing was changed", SECTION)
    return names


def restore(model: torch.nn.Module) -> List[str]:
    """Undo :func:`apply`: every :class:`DeepEPMOELayer` of ``model`` becomes a plain ``MOELayer`` again.

    Returns:
        Names of the restored modules.
    """
    names = []
    for name, m in model.named_modules():
        if type(m) is DeepEPMOELayer:
            m.__class__ = MOELayer
            del m.deepep_options
            names.append(name)
    return names


def initialize(*args: Any, **kwargs: Any) -> Any:
    """Drop-in for ``deepspeed.initialize``: :func:`apply` with its ``model`` and config, then initialize.

    Takes exactly the arguments of ``deepspeed.initialize`` (the config from ``config``, ``config_params`` or
    ``args.deepspeed_config``) and returns what it returns: ``(engine, optimizer, training_dataloader,
    lr_scheduler)``.
    """
    bound = inspect.signature(deepspeed.initialize).bind(*args, **kwargs)
    params = bound.arguments
    config = params.get("config")
    if config is None:
        config = params.get("config_params")
    cli_args = params.get("args")
    if config is None and cli_args is not None:
        config = getattr(cli_args, "deepspeed_config", None)
    model = params.get("model")
    expect(model is not None, "initialize: pass the model (model=...), as deepspeed.initialize requires")
    apply(model, config, mpu=params.get("mpu"))
    return deepspeed.initialize(*args, **kwargs)
