"""Train a small DeepSeek-V3-style MoE GPT built from megatron-core modules, with token dispatch on deepep_plugin.

Launch (``run_cpu.sh`` runs this on 2 CPU processes)::

    torchrun --nproc-per-node 2 examples/megatron/pretrain_moe.py \\
        --moe-token-dispatcher-type flex --moe-flex-dispatcher-backend deepep \\
        --deepep-plugin --deepep-plugin-mode dispatcher ...

The flags are Megatron-LM's own names (a subset, parsed here because megatron-core ships without Megatron-LM's
argument parser); the ``--deepep-plugin*`` flags come from ``add_megatron_args``, exactly as a Megatron-LM
``pretrain_gpt.py`` gets them through its ``extra_args_provider``. The data are generated (no download): each
sequence follows ``token[i+1] = (a * token[i] + b) mod vocab`` with per-sequence ``(a, b)`` drawn from a small set,
so the loss falls within a few steps. Rank 0 logs ``step <i> loss <value>`` (the loss averaged over ranks).

On a machine without CUDA it runs on CPU over gloo, after applying the CPU shims in ``cpu_shims.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from deepep_plugin.integrations import megatron as dp_megatron


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_argument_group("model (Megatron-LM flag names)")
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--hidden-size", type=int, default=128)
    g.add_argument("--ffn-hidden-size", type=int, default=256)
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--seq-length", type=int, default=32)
    g.add_argument("--vocab-size", type=int, default=64)
    g.add_argument("--num-experts", type=int, default=8)
    g.add_argument("--moe-ffn-hidden-size", type=int, default=64)
    g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None)
    g.add_argument("--moe-router-topk", type=int, default=4)
    g.add_argument("--moe-router-score-function", choices=["softmax", "sigmoid"], default="sigmoid")
    g.add_argument("--moe-router-enable-expert-bias", action="store_true")
    g.add_argument("--moe-router-bias-update-rate", type=float, default=1e-3)
    g.add_argument("--moe-router-num-groups", type=int, default=None)
    g.add_argument("--moe-router-group-topk", type=int, default=None)
    g.add_argument("--moe-router-topk-scaling-factor", type=float, default=None)
    g.add_argument("--moe-router-load-balancing-type", default="seq_aux_loss")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=1e-4)
    g.add_argument("--moe-router-dtype", choices=["fp32", "fp64"], default="fp32")
    g.add_argument("--moe-token-dispatcher-type", choices=["allgather", "alltoall", "flex"], default="allgather")
    g.add_argument("--moe-flex-dispatcher-backend", choices=["deepep", "hybridep"], default="deepep")
    g.add_argument("--moe-deepep-num-sms", type=int, default=20)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--bf16", action="store_true")
    t = p.add_argument_group("training")
    t.add_argument("--micro-batch-size", type=int, default=4)
    t.add_argument("--train-iters", type=int, default=20)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--log-interval", type=int, default=1)
    dp_megatron.add_megatron_args(p)
    return p.parse_args(argv)


def transformer_config(args: argparse.Namespace, on_cpu: bool):
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    return TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, num_moe_experts=args.num_experts,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
        moe_router_topk=args.moe_router_topk, moe_router_score_function=args.moe_router_score_function,
        moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=args.moe_router_bias_update_rate,
        moe_router_num_groups=args.moe_router_num_groups, moe_router_group_topk=args.moe_router_group_topk,
        moe_router_topk_scaling_factor=args.moe_router_topk_scaling_factor,
        moe_router_pre_softmax=args.moe_router_score_function == "sigmoid",
        moe_router_load_balancing_type=args.moe_router_load_balancing_type,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff, moe_router_dtype=args.moe_router_dtype,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        moe_flex_dispatcher_backend=args.moe_flex_dispatcher_backend, moe_deepep_num_sms=args.moe_deepep_num_sms,
        expert_model_parallel_size=args.expert_model_parallel_size,
        bf16=args.bf16, params_dtype=dtype, pipeline_dtype=dtype, add_bias_linear=False,
        use_cpu_initialization=on_cpu, gradient_accumulation_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        attention_dropout=0.0, hidden_dropout=0.0,
    )


def build_model(args: argparse.Namespace, config):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(num_experts=args.num_experts, moe_grouped_gemm=False)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=args.vocab_size,
                    max_sequence_length=args.seq_length, position_embedding_type="rope")


def make_batch(step: int, rank: int, args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Sequences of an affine recurrence mod ``vocab``, different on every rank and step.

    Returns ``(tokens [B, S] int64, position_ids [B, S] int64, causal_mask [1, 1, S, S] bool, labels [B, S])``.
    """
    g = torch.Generator().manual_seed(args.seed * 1000003 + step * 101 + rank)
    b, s, v = args.micro_batch_size, args.seq_length, args.vocab_size
    rules = torch.tensor([[1, 1], [1, 3], [3, 1], [5, 7]])  # (a, b) pairs; the model infers the rule in context
    rule = rules[torch.randint(len(rules), (b,), generator=g)]
    seq = torch.empty(b, s + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(v, (b,), generator=g)
    for i in range(s):
        seq[:, i + 1] = (rule[:, 0] * seq[:, i] + rule[:, 1]) % v
    tokens, labels = seq[:, :-1].to(device), seq[:, 1:].to(device)
    position_ids = torch.arange(s, device=device).unsqueeze(0).expand(b, -1)
    causal_mask = torch.ones(1, 1, s, s, dtype=torch.bool, device=device).triu(diagonal=1)  # True = masked out
    return tokens, position_ids, causal_mask, labels


def allreduce_dense_grads(model: torch.nn.Module) -> None:
    """Average the gradients of the data-parallel (non-expert) parameters over all ranks.

    Expert weights are sharded over the EP group (Megatron marks them ``allreduce=False``); with EP = world size
    there is no expert data parallelism, so their gradients stay local.
    """
    world = dist.get_world_size()
    for p in model.parameters():
        if p.grad is not None and getattr(p, "allreduce", True):
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def update_expert_bias(model: torch.nn.Module, rate: float) -> None:
    """Aux-loss-free balancing: move each router's expert bias towards the mean load (once per step)."""
    from megatron.core.transformer.moe.moe_utils import get_updated_expert_bias

    for module in model.modules():
        if getattr(module, "expert_bias", None) is not None:
            module.expert_bias.copy_(get_updated_expert_bias(module.local_tokens_per_expert, module.expert_bias, rate))
            module.local_tokens_per_expert.zero_()


def _progress_bar(total: int, enabled: bool):
    """A tqdm bar on a terminal (rank 0), else None: plain log lines only."""
    if not (enabled and sys.stderr.isatty()):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="train", dynamic_ncols=True, file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> list[float]:
    args = parse_args(argv)
    on_cpu = not torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    # Ranks sharing a GPU (more processes than GPUs on this host) talk over gloo: NCCL refuses two ranks on one GPU.
    shared_gpu = not on_cpu and local_world > torch.cuda.device_count()
    dist.init_process_group("gloo" if on_cpu or shared_gpu else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if on_cpu:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from cpu_shims import apply_cpu_shims

        apply_cpu_shims()
        torch.set_num_threads(1)
        device = torch.device("cpu")
    else:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        if shared_gpu and rank == 0:
            print(f"{local_world} ranks share {torch.cuda.device_count()} GPU(s) over gloo: timings not "
                  "representative", flush=True)
        device = torch.device("cuda")

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(expert_model_parallel_size=args.expert_model_parallel_size)
    if not on_cpu:
        model_parallel_cuda_manual_seed(args.seed)
    settings = dp_megatron.enable(args)  # binds the flex dispatcher to deepep_plugin (or does nothing)
    if rank == 0:
        print(f"deepep_plugin: {settings}", flush=True)

    torch.manual_seed(args.seed)
    config = transformer_config(args, on_cpu)
    model = build_model(args, config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)

    losses = []
    bar = _progress_bar(args.train_iters, rank == 0)
    for step in range(1, args.train_iters + 1):
        start = time.perf_counter()
        tokens, position_ids, causal_mask, labels = make_batch(step, rank, args, device)
        optimizer.zero_grad(set_to_none=True)
        per_token = model(tokens, position_ids, attention_mask=causal_mask, labels=labels)  # [B, S]
        loss = per_token.float().mean()
        loss.backward()
        allreduce_dense_grads(model)
        if config.moe_router_enable_expert_bias:
            update_expert_bias(model, config.moe_router_bias_update_rate)
        optimizer.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss = mean_loss.item() / world
        losses.append(mean_loss)
        line = f"step {step} loss {mean_loss:.4f} time {1e3 * (time.perf_counter() - start):.0f} ms"
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"loss {mean_loss:.4f}")
        if rank == 0 and step % args.log_interval == 0:
            if bar is not None:
                bar.write(line)
            else:
                print(line, flush=True)
    if bar is not None:
        bar.close()
    dp_megatron.disable()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    main()
