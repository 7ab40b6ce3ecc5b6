"""The ``"deepep_plugin"`` section of a DeepSpeed JSON config: reading and validating it.

DeepSpeed keeps unknown top-level keys of its config untouched (no error, no warning), so the plugin's options
live in the same file the user gives ``deepspeed.initialize``::

    "deepep_plugin": {
        "enabled": true,          # swap every DeepSpeed MoE layer for the plugin's layer
        "backend": "auto",        # "auto" | "reference" | "cuda": the deepep_plugin.Buffer backend
        "fp8_dispatch": false,    # send tokens as FP8 (per-token, per-128-channel scales); hidden % 128 == 0
        "num_sms": 24,            # SMs the normal GPU kernels may use (even, >= 2)
        "group_limited_gating": { # optional: DeepSeek-V3 group-limited top-k instead of DeepSpeed's gating
            "num_groups": 8, "topk_group": 4, "score_function": "sigmoid",
            "routed_scaling_factor": 2.5, "normalize": true
        }
    }

Every key is optional; a missing section means "disabled". A key that is unknown or has the wrong type or
value raises :class:`deepep_plugin.errors.DeepEPInputError` naming it (``deepep_plugin.num_sms`` ...).
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from deepep_plugin.errors import DeepEPInputError, expect

from .gating import GroupLimitedGating

#: Name of the top-level section in the DeepSpeed config.
SECTION = "deepep_plugin"

BACKENDS = ("auto", "reference", "cuda")
SCORE_FUNCTIONS = ("softmax", "sigmoid")

#: Default SM budget of the normal kernels: on the project's H200 pair, SM-driven NVLink stores (one 1024-thread
#: block per SM) reach 350 GB/s with 24 SMs against 365 GB/s with all 132, so 24 leaves the rest to the GEMMs for
#: a 4 % bandwidth cost. DeepEP's own default is 20.
DEFAULT_NUM_SMS = 24

ConfigSource = Union[str, os.PathLike, Mapping[str, Any], None]


@dataclass(frozen=True)
class PluginOptions:
    """Validated contents of the ``"deepep_plugin"`` section (defaults = section absent or empty)."""

    enabled: bool = False
    backend: str = "auto"
    fp8_dispatch: bool = False
    num_sms: int = DEFAULT_NUM_SMS
    group_limited_gating: Optional[GroupLimitedGating] = None


def load_ds_config(config: ConfigSource) -> dict:
    """Read a DeepSpeed config the way ``deepspeed.initialize`` does.

    Args:
        config: a dict (used as is), a path to a JSON/HJSON file, or a base64-encoded JSON string.

    Returns:
        The config as a dict.
    """
    if isinstance(config, Mapping):
        return dict(config)
    expect(
        isinstance(config, (str, os.PathLike)),
        f"config must be a dict, a path to a DeepSpeed JSON file or a base64 JSON string, got {type(config).__name__}",
    )
    path = os.fspath(config)
    if os.path.exists(path):
        import hjson

        with open(path) as f:
            loaded = hjson.load(f, object_pairs_hook=dict)
        expect(isinstance(loaded, dict), f"config file {path} must hold a JSON object, got {type(loaded).__name__}")
        return loaded
    try:
        loaded = json.loads(base64.urlsafe_b64decode(path).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise DeepEPInputError(
            f"config {path!r} is neither an existing file nor a base64-encoded JSON object"
        ) from None
    expect(isinstance(loaded, dict), f"base64 config must decode to a JSON object, got {type(loaded).__name__}")
    return loaded


def _key(name: str) -> str:
    return f"{SECTION}.{name}"


def _bool(section: Mapping[str, Any], name: str, default: bool, where: str = SECTION) -> bool:
    value = section.get(name, default)
    expect(isinstance(value, bool), f"{where}.{name} must be true or false, got {value!r}")
    return value


def _group_limited(raw: Any) -> Optional[GroupLimitedGating]:
    where = _key("group_limited_gating")
    if raw is None:
        return None
    expect(isinstance(raw, Mapping), f"{where} must be an object (or null), got {raw!r}")
    known = {"num_groups", "topk_group", "score_function", "routed_scaling_factor", "normalize"}
    unknown = sorted(set(raw) - known)
    expect(not unknown, f"{where} has unknown key(s) {unknown}; known keys: {sorted(known)}")
    num_groups = raw.get("num_groups", 1)
    topk_group = raw.get("topk_group", 1)
    expect(_is_int(num_groups) and num_groups >= 1, f"{where}.num_groups must be an integer >= 1, got {num_groups!r}")
    expect(
        _is_int(topk_group) and 1 <= topk_group <= num_groups,
        f"{where}.topk_group must be an integer in [1, num_groups={num_groups}], got {topk_group!r}",
    )
    score_function = raw.get("score_function", "softmax")
    expect(
        score_function in SCORE_FUNCTIONS,
        f"{where}.score_function must be one of {list(SCORE_FUNCTIONS)}, got {score_function!r}",
    )
    scale = raw.get("routed_scaling_factor", 1.0)
    expect(
        isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0,
        f"{where}.routed_scaling_factor must be a number > 0, got {scale!r}",
    )
    normalize = raw.get("normalize", None)
    expect(normalize is None or isinstance(normalize, bool), f"{where}.normalize must be true, false or null")
    return GroupLimitedGating(num_groups, topk_group, score_function, float(scale), normalize)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_section(section: Optional[Mapping[str, Any]]) -> PluginOptions:
    """Validate a ``"deepep_plugin"`` section (the dict under that key, or ``None``) into :class:`PluginOptions`."""
    if section is None:
        return PluginOptions()
    expect(isinstance(section, Mapping), f"{SECTION} must be a JSON object, got {section!r}")
    known = {"enabled", "backend", "fp8_dispatch", "num_sms", "group_limited_gating"}
    unknown = sorted(set(section) - known)
    expect(not unknown, f"{SECTION} has unknown key(s) {unknown}; known keys: {sorted(known)}")
    enabled = _bool(section, "enabled", False)
    backend = section.get("backend", "auto")
    expect(backend in BACKENDS, f"{_key('backend')} must be one of {list(BACKENDS)}, got {backend!r}")
    fp8_dispatch = _bool(section, "fp8_dispatch", False)
    num_sms = section.get("num_sms", DEFAULT_NUM_SMS)
    expect(
        _is_int(num_sms) and num_sms >= 2 and num_sms % 2 == 0,
        f"{_key('num_sms')} must be an even integer >= 2 (two SMs per channel), got {num_sms!r}",
    )
    return PluginOptions(enabled, backend, fp8_dispatch, num_sms, _group_limited(section.get("group_limited_gating")))


def read_options(config: ConfigSource) -> PluginOptions:
    """:class:`PluginOptions` from a DeepSpeed config (dict, JSON path or base64 string; ``None`` = disabled)."""
    if config is None:
        return PluginOptions()
    return parse_section(load_ds_config(config).get(SECTION))
