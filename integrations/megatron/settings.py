"""The plugin's Megatron settings: one dataclass, read from Megatron-LM arguments, a YAML file or a mapping.

Megatron-LM training scripts add the flags with :func:`add_megatron_args` as (part of) their
``extra_args_provider``; the parsed ``args`` then go to :func:`deepep_plugin.integrations.megatron.enable`.
Configuration-file users put the same settings in YAML, either flat (``deepep_plugin_mode: dispatcher``, as
Megatron-LM's ``--yaml-cfg`` files spell arguments) or nested::

    deepep_plugin:
      enabled: true
      mode: dispatcher          # or compat
      fp8_dispatch: true
      num_sms: 24

Every value is checked here (type, range, choices) and against the Megatron MoE settings it must agree with
(:func:`check_against_megatron`), so a wrong combination fails at start-up with a message naming both settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Mapping, Optional

from deepep_plugin.errors import DeepEPInputError, expect

#: ``compat``: Megatron's own flex/DeepEP path (``fused_a2a``) runs on ``deepep_plugin.Buffer``.
#: ``dispatcher``: the plugin's own token dispatcher replaces the flex dispatcher (FP8 dispatch, padding, ...).
MODES = ("compat", "dispatcher")

#: ``auto``: a CPU tensor when the experts need one (legacy ``GroupedMLP``), else on the tokens' device.
TOKENS_PER_EXPERT_DEVICES = ("auto", "cpu", "device")

#: Megatron's default for ``moe_deepep_num_sms``; a different value there is an explicit user choice. From 0.17 on the
#: field defaults to ``None`` and ``moe_flex_dispatcher_num_sms`` (also ``None`` by default) replaces it; ``None`` in
#: both means this value, as in Megatron's own DeepEP manager.
MEGATRON_DEFAULT_DEEPEP_NUM_SMS = 20


def megatron_num_sms(config: Any) -> int:
    """The SM count a Megatron config asks the DeepEP backend for, on every supported megatron-core.

    ``moe_flex_dispatcher_num_sms`` (0.17+) wins, then ``moe_deepep_num_sms``; where both are missing or ``None``,
    Megatron's default :data:`MEGATRON_DEFAULT_DEEPEP_NUM_SMS`.
    """
    for name in ("moe_flex_dispatcher_num_sms", "moe_deepep_num_sms"):
        value = getattr(config, name, None)
        if value is not None:
            return value
    return MEGATRON_DEFAULT_DEEPEP_NUM_SMS

_PREFIX = "deepep_plugin_"


@dataclasses.dataclass(frozen=True)
class PluginSettings:
    """What ``enable`` applies. Field names are the flag names without ``--deepep-plugin-``.

    Attributes:
        enabled: run MoE token dispatch on deepep_plugin (``--deepep-plugin``).
        mode: one of :data:`MODES`.
        fp8_dispatch: cast tokens to FP8 (per token, per 128 channels) once before dispatch, dequantise after
            (``dispatcher`` mode; the hidden size must be a multiple of 128).
        num_sms: SMs the normal kernels may use (even, positive); ``None`` keeps Megatron's
            ``moe_deepep_num_sms``.
        expert_alignment: pad every local expert's token block to a multiple of this for grouped GEMMs
            (``dispatcher`` mode); ``None`` takes Megatron's quantization alignment when
            ``moe_router_padding_for_quantization`` is set, else 1.
        tokens_per_expert_device: where ``dispatcher`` mode returns ``tokens_per_expert``
            (:data:`TOKENS_PER_EXPERT_DEVICES`).
        sync_free: ``dispatcher`` mode reads nothing from the GPU in a layer's forward and backward, so the MoE
            layer can be captured in a CUDA graph: dispatch pads its outputs to ``worst_tokens`` rows
            (``num_worst_tokens``), the permutation has a static size and ``tokens_per_expert`` stays on the
            device. The experts must use it there without reading it: of megatron-core's own, only
            ``SequentialMLP`` with one local expert does (``TEGroupedMLP``, and ``SequentialMLP`` with several local
            experts, call ``tokens_per_expert.tolist()``; the dispatcher warns when it builds such a layer).
        worst_tokens: rows a rank can receive at most, for ``sync_free``; ``None``: every token of every rank of
            the group (``tokens x EP size``, the true worst case when all ranks hold the same token count).
    """

    enabled: bool = True
    mode: str = "dispatcher"
    fp8_dispatch: bool = False
    num_sms: Optional[int] = None
    expert_alignment: Optional[int] = None
    tokens_per_expert_device: str = "auto"
    sync_free: bool = False
    worst_tokens: Optional[int] = None

    def __post_init__(self) -> None:
        expect(isinstance(self.enabled, bool), f"deepep_plugin: 'enabled' must be a bool, got {self.enabled!r}")
        expect(self.mode in MODES, f"deepep_plugin: 'mode' must be one of {MODES}, got {self.mode!r}")
        expect(isinstance(self.fp8_dispatch, bool),
               f"deepep_plugin: 'fp8_dispatch' must be a bool, got {self.fp8_dispatch!r}")
        if self.num_sms is not None:
            expect(_is_int(self.num_sms) and self.num_sms > 0 and self.num_sms % 2 == 0,
                   f"deepep_plugin: 'num_sms' must be a positive even int (the kernels pair SMs), got {self.num_sms!r}")
        if self.expert_alignment is not None:
            expect(_is_int(self.expert_alignment) and self.expert_alignment >= 1,
                   f"deepep_plugin: 'expert_alignment' must be an int >= 1, got {self.expert_alignment!r}")
        expect(self.tokens_per_expert_device in TOKENS_PER_EXPERT_DEVICES,
               f"deepep_plugin: 'tokens_per_expert_device' must be one of {TOKENS_PER_EXPERT_DEVICES}, "
               f"got {self.tokens_per_expert_device!r}")
        expect(isinstance(self.sync_free, bool), f"deepep_plugin: 'sync_free' must be a bool, got {self.sync_free!r}")
        if self.worst_tokens is not None:
            expect(_is_int(self.worst_tokens) and self.worst_tokens > 0,
                   f"deepep_plugin: 'worst_tokens' must be a positive int, got {self.worst_tokens!r}")
            expect(self.sync_free, "deepep_plugin: 'worst_tokens' is the capacity of 'sync_free'; set sync_free")
        if self.sync_free:
            expect(self.tokens_per_expert_device != "cpu",
                   "deepep_plugin: sync_free keeps tokens_per_expert on the device (a CPU copy reads the GPU); "
                   "set tokens_per_expert_device to 'auto' or 'device'")
        if self.mode == "compat":
            expect(not self.sync_free,
                   "deepep_plugin: sync_free needs mode 'dispatcher' (Megatron's own DeepEP path reads the receive "
                   "counts on the host)")
            expect(not self.fp8_dispatch,
                   "deepep_plugin: fp8_dispatch needs mode 'dispatcher' (Megatron's own DeepEP path, mode 'compat', "
                   "always dispatches the unquantised hidden states)")
            expect(self.expert_alignment is None,
                   "deepep_plugin: expert_alignment needs mode 'dispatcher' (in mode 'compat' Megatron pads itself, "
                   "with --moe-router-padding-for-quantization)")
            expect(self.tokens_per_expert_device == "auto",
                   "deepep_plugin: tokens_per_expert_device needs mode 'dispatcher' (Megatron's own flex path always "
                   "returns a CPU tensor)")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def add_megatron_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the plugin's flags to a Megatron-LM argument parser; returns ``parser`` (an ``extra_args_provider``).

    Compose with a script's own provider as ``lambda p: my_provider(add_megatron_args(p))``.
    """
    group = parser.add_argument_group(title="deepep_plugin", description="MoE token dispatch on deepep_plugin")
    group.add_argument("--deepep-plugin", action=argparse.BooleanOptionalAction, default=False, dest="deepep_plugin",
                       help="Run MoE token dispatch on deepep_plugin. Needs --moe-token-dispatcher-type flex "
                            "(and --moe-flex-dispatcher-backend deepep, the default).")
    group.add_argument("--deepep-plugin-mode", choices=MODES, default=PluginSettings.mode,
                       help="compat: Megatron's own flex/DeepEP code runs on deepep_plugin.Buffer. dispatcher "
                            "(default): deepep_plugin's token dispatcher (FP8 dispatch, expert padding, ...).")
    group.add_argument("--deepep-plugin-fp8-dispatch", action="store_true",
                       help="Cast tokens to FP8 once before dispatch (dispatcher mode; hidden size % 128 == 0).")
    group.add_argument("--deepep-plugin-num-sms", type=int, default=None,
                       help="SMs for the dispatch/combine kernels (even). Default: --moe-deepep-num-sms.")
    group.add_argument("--deepep-plugin-expert-alignment", type=int, default=None,
                       help="Pad each local expert's tokens to a multiple of this (dispatcher mode). Default: the "
                            "quantization alignment with --moe-router-padding-for-quantization, else 1.")
    group.add_argument("--deepep-plugin-tokens-per-expert-device", choices=TOKENS_PER_EXPERT_DEVICES,
                       default=PluginSettings.tokens_per_expert_device,
                       help="Where the dispatcher returns tokens_per_expert: auto (CPU only for experts that "
                            "need it), cpu, or device (no device-to-host copy in the dispatcher).")
    group.add_argument("--deepep-plugin-sync-free", action="store_true",
                       help="Dispatcher mode reads nothing from the GPU (fixed worst-case shapes; the MoE layer can "
                            "be captured in a CUDA graph). Needs experts that take tokens_per_expert on the device.")
    group.add_argument("--deepep-plugin-worst-tokens", type=int, default=None,
                       help="Rows a rank can receive at most, for --deepep-plugin-sync-free. Default: tokens x EP "
                            "size (every token of every rank).")
    return parser


def _from_flat(values: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``deepep_plugin`` / ``deepep_plugin_<field>`` keys of a Megatron-LM args-style mapping -> field values."""
    out: dict[str, Any] = {}
    known = PluginSettings.field_names()
    for key, value in values.items():
        if key == "deepep_plugin":
            out["enabled"] = value
        elif key.startswith(_PREFIX):
            name = key[len(_PREFIX):]
            if name not in known or name == "enabled":
                raise DeepEPInputError(f"deepep_plugin: unknown setting {key!r} in {what}; known: "
                                       + ", ".join(["deepep_plugin"] + [_PREFIX + n for n in known if n != "enabled"]))
            out[name] = value
    return out


def _from_nested(section: Mapping[str, Any], what: str) -> dict[str, Any]:
    known = PluginSettings.field_names()
    unknown = sorted(set(section) - set(known))
    expect(not unknown, f"deepep_plugin: unknown setting(s) {unknown} in the 'deepep_plugin' section of {what}; "
                        f"known: {list(known)}")
    return dict(section)


def _load_yaml(path: str) -> Mapping[str, Any]:
    try:
        import yaml
    except ImportError as e:  # pragma: no cover - pyyaml ships with Megatron-LM's requirements
        raise DeepEPInputError(f"deepep_plugin: reading {path!r} needs PyYAML (pip install pyyaml)") from e
    with open(path) as f:
        data = yaml.safe_load(f)
    expect(isinstance(data, Mapping), f"deepep_plugin: {path!r} must hold a YAML mapping, got {type(data).__name__}")
    return data


def settings_from(source: Any, what: Optional[str] = None) -> tuple[PluginSettings, Mapping[str, Any]]:
    """Read the settings and the Megatron MoE values they are checked against from ``source``.

    Args:
        source: parsed Megatron-LM ``args`` (``argparse.Namespace`` or any object with attributes), a
            ``TransformerConfig`` (plugin defaults; its MoE fields are checked), a mapping (flat
            ``deepep_plugin_*`` keys or a nested ``deepep_plugin`` section), a path to a YAML file holding such a
            mapping, or ``None`` (defaults, nothing to check against).
        what: how to name ``source`` in error messages.

    Returns:
        ``(settings, megatron_values)``: the validated settings and a mapping of the source's other values
        (Megatron's ``moe_*`` settings), empty when the source has none.
    """
    if source is None:
        return PluginSettings(), {}
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        return settings_from(_load_yaml(path), what or f"YAML file {path!r}")
    if isinstance(source, Mapping):
        values: Mapping[str, Any] = source
        what = what or "the config mapping"
    else:
        values = {k: v for k, v in vars(source).items() if not k.startswith("_")} if hasattr(source, "__dict__") \
            else {}
        what = what or type(source).__name__
    nested = values.get("deepep_plugin")
    if isinstance(nested, Mapping):
        fields = _from_nested(nested, what)
        flat = {k: v for k, v in values.items() if k.startswith(_PREFIX)}
        expect(not flat, f"deepep_plugin: {what} has both a 'deepep_plugin' section and flat keys {sorted(flat)}; "
                         "use one form")
    else:
        fields = _from_flat(values, what)
        if not fields and "moe_token_dispatcher_type" in values:
            fields = {"enabled": True}  # a bare TransformerConfig: the caller asked for the plugin explicitly
    fields = {k: v for k, v in fields.items() if v is not None or k in ("num_sms", "expert_alignment")}
    return PluginSettings(**fields), values


def check_against_megatron(settings: PluginSettings, megatron: Mapping[str, Any], what: str = "the config") -> None:
    """Raise ``DeepEPInputError`` when the plugin settings contradict Megatron's own MoE settings."""
    if not settings.enabled or not megatron:
        return
    dispatcher_type = megatron.get("moe_token_dispatcher_type")
    if megatron.get("moe_enable_deepep"):
        dispatcher_type = dispatcher_type or "flex"
    if dispatcher_type is not None:
        expect(dispatcher_type == "flex",
               f"deepep_plugin: enabled, but {what} sets moe_token_dispatcher_type={dispatcher_type!r}; the plugin "
               "replaces the flex dispatcher, so pass --moe-token-dispatcher-type flex")
    backend = megatron.get("moe_flex_dispatcher_backend")
    if backend is not None:
        expect(backend == "deepep",
               f"deepep_plugin: enabled, but {what} sets moe_flex_dispatcher_backend={backend!r}; the plugin "
               "implements the 'deepep' backend (--moe-flex-dispatcher-backend deepep)")
    for key in ("moe_flex_dispatcher_num_sms", "moe_deepep_num_sms"):
        mcore_sms = megatron.get(key)
        if settings.num_sms is not None and mcore_sms is not None and mcore_sms != MEGATRON_DEFAULT_DEEPEP_NUM_SMS:
            expect(mcore_sms == settings.num_sms,
                   f"deepep_plugin: num_sms={settings.num_sms} conflicts with {key}={mcore_sms} in {what}; "
                   "set one of them")
    if settings.fp8_dispatch:
        hidden = megatron.get("moe_latent_size") or megatron.get("hidden_size")
        if hidden is not None:
            expect(hidden % 128 == 0,
                   f"deepep_plugin: fp8_dispatch needs the dispatched hidden size to be a multiple of 128 "
                   f"(one scale per 128 channels), got {hidden}")
