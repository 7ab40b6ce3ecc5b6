"""Sizes of the DeepSeek-V3-style example model and of its training runs, by preset name.

``ModelConfig`` holds the architecture (the names follow DeepSeek-V3's ``config.json`` where one exists:
``first_k_dense_replace``, ``n_routed_experts``, ``n_group``, ``topk_group``, ``routed_scaling_factor``,
``kv_lora_rank`` ...); ``TrainConfig`` holds the run (batch, steps, learning rate). A preset pairs one of each:

* ``tiny``: runs on 2 CPU processes of one core each in about a minute (the README's first command);
* ``small``: a few hundred million parameters, one GPU per process, a few minutes;
* ``medium``: DeepSeek-V3's hidden size (7168) and routing shape (256 experts, 8 groups, top-8 of 4 groups) with
  narrow experts and 2 layers, so dispatch/combine move DeepSeek-V3-sized tokens while the model fits one GPU.

Every field can be overridden from the command line (``--set hidden_size=256``) or a JSON file (``--config``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Tuple

from deepep_plugin.errors import expect


@dataclass
class ModelConfig:
    """Architecture of the DeepSeek-V3-style decoder (all sizes are global, i.e. before expert parallelism)."""

    vocab_size: int = 256
    hidden_size: int = 128
    num_layers: int = 3
    #: The first ``first_k_dense_replace`` layers use a dense SwiGLU MLP instead of the MoE (DeepSeek-V3: 3).
    first_k_dense_replace: int = 1
    intermediate_size: int = 256  # dense MLP
    # Multi-head latent attention (MLA): keys and values are rebuilt from a ``kv_lora_rank`` latent, plus one
    # rotary key of ``qk_rope_head_dim`` shared by all heads. ``q_lora_rank = 0`` projects queries directly.
    num_heads: int = 4
    q_lora_rank: int = 0
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    rope_theta: float = 10000.0
    # MoE: ``n_shared_experts`` dense experts every token uses plus ``n_routed_experts`` fine-grained experts of
    # which each token uses ``num_experts_per_tok``, chosen inside its ``topk_group`` best of ``n_group`` groups.
    n_routed_experts: int = 16
    n_shared_experts: int = 1
    moe_intermediate_size: int = 64
    num_experts_per_tok: int = 4
    n_group: int = 4
    topk_group: int = 2
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    #: Aux-loss-free balancing: each step every expert bias moves by this much towards the mean load.
    bias_update_speed: float = 1e-3
    #: Send tokens as FP8 (E4M3, one scale per 128 channels) in dispatch; needs ``hidden_size % 128 == 0``.
    fp8_dispatch: bool = False
    #: Run the local experts as two grouped GEMMs (``torch._grouped_mm``) on Hopper GPUs in BF16, instead of a
    #: loop of one GEMM pair per expert (the loop stays the path everywhere else).
    grouped_gemm: bool = True
    rms_norm_eps: float = 1e-6
    init_std: float = 0.02

    def validate(self) -> None:
        """Raise ``DeepEPInputError`` naming the first inconsistent field."""
        expect(self.vocab_size > 1, f"vocab_size must be > 1, got {self.vocab_size}")
        expect(self.num_layers >= 1, f"num_layers must be >= 1, got {self.num_layers}")
        expect(0 <= self.first_k_dense_replace <= self.num_layers,
               f"first_k_dense_replace must be in [0, num_layers={self.num_layers}], got {self.first_k_dense_replace}")
        expect(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        expect(self.n_routed_experts % self.n_group == 0,
               f"n_group ({self.n_group}) must divide n_routed_experts ({self.n_routed_experts})")
        expect(1 <= self.topk_group <= self.n_group, f"topk_group must be in [1, n_group={self.n_group}]")
        per_group = self.n_routed_experts // self.n_group
        expect(1 <= self.num_experts_per_tok <= self.topk_group * per_group,
               f"num_experts_per_tok must be in [1, topk_group * experts per group = {self.topk_group * per_group}],"
               f" got {self.num_experts_per_tok}")
        expect(not self.fp8_dispatch or self.hidden_size % 128 == 0,
               f"fp8_dispatch needs hidden_size to be a multiple of 128 (one scale per 128 channels), "
               f"got hidden_size={self.hidden_size}")

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense_replace


@dataclass
class TrainConfig:
    """One training run. ``batch_size`` is sequences per rank per step (data parallel = expert parallel group)."""

    steps: int = 150
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1234
    log_interval: int = 10
    eval_batches: int = 4
    #: Data: a random first-order Markov chain where every token has ``markov_branching`` possible successors.
    markov_branching: int = 4


@dataclass
class Preset:
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    description: str = ""


PRESETS: Dict[str, Preset] = {
    "tiny": Preset(
        ModelConfig(),
        TrainConfig(),
        "CPU: 3 layers (1 dense + 2 MoE), hidden 128, 16 routed experts top-4 of 2/4 groups + 1 shared, MLA",
    ),
    "small": Preset(
        ModelConfig(
            vocab_size=4096, hidden_size=1024, num_layers=8, first_k_dense_replace=1, intermediate_size=2816,
            num_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
            v_head_dim=64, n_routed_experts=64, n_shared_experts=1, moe_intermediate_size=352,
            num_experts_per_tok=6, n_group=8, topk_group=4,
        ),
        TrainConfig(steps=300, batch_size=16, seq_len=512, lr=1e-3, warmup_steps=30, log_interval=20),
        "GPU: 8 layers, hidden 1024, 64 routed experts top-6 of 4/8 groups + 1 shared, MLA",
    ),
    "medium": Preset(
        ModelConfig(
            vocab_size=8192, hidden_size=7168, num_layers=2, first_k_dense_replace=1, intermediate_size=8192,
            num_heads=32, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
            v_head_dim=128, n_routed_experts=256, n_shared_experts=1, moe_intermediate_size=256,
            num_experts_per_tok=8, n_group=8, topk_group=4,
        ),
        TrainConfig(steps=50, batch_size=4, seq_len=1024, lr=3e-4, warmup_steps=10, log_interval=5),
        "GPU: hidden 7168, 256 narrow routed experts top-8 of 4/8 groups + 1 shared, 2 layers (1 MoE)",
    ),
}


def _coerce(kind: Any, raw: str) -> Any:
    if kind is bool or kind == "bool":
        expect(raw.lower() in ("1", "0", "true", "false", "yes", "no"), f"expected a boolean, got {raw!r}")
        return raw.lower() in ("1", "true", "yes")
    if kind is int or kind == "int":
        return int(raw)
    if kind is float or kind == "float":
        return float(raw)
    return raw


def apply_overrides(model: ModelConfig, train: TrainConfig, overrides: Mapping[str, Any]) -> None:
    """Set fields of ``model`` or ``train`` by name (strings are converted to the field's type)."""
    model_fields = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    train_fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    for name, value in overrides.items():
        target, kind = (model, model_fields[name]) if name in model_fields else (train, train_fields.get(name))
        expect(kind is not None, f"unknown config field {name!r}; model fields: {sorted(model_fields)}; "
                                 f"train fields: {sorted(train_fields)}")
        setattr(target, name, _coerce(kind, value) if isinstance(value, str) else value)


def load_preset(name: str, config_file: str | None = None, overrides: Mapping[str, Any] | None = None
                ) -> Tuple[ModelConfig, TrainConfig]:
    """Return fresh ``(ModelConfig, TrainConfig)`` of preset ``name``, then a JSON file's fields, then overrides.

    The JSON file is a flat object of field names (model and train fields mixed), e.g. ``{"hidden_size": 256}``.
    """
    expect(name in PRESETS, f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    preset = PRESETS[name]
    model, train = dataclasses.replace(preset.model), dataclasses.replace(preset.train)
    if config_file is not None:
        with open(config_file) as f:
            apply_overrides(model, train, json.load(f))
    apply_overrides(model, train, overrides or {})
    model.validate()
    return model, train
