"""Train the DeepSeek-V3-style MoE model with DeepSpeed, deepep_plugin enabled from the DeepSpeed JSON config.

    python -m examples.deepspeed.train --deepspeed_config examples/deepspeed/ds_config.json      # 2 CPU processes
    deepspeed --num_gpus 8 --module examples.deepspeed.train --deepspeed_config examples/deepspeed/ds_config.json

Without a launcher (no ``RANK`` in the environment) the script starts ``--nprocs`` processes itself (default:
one per GPU, or 2 on a machine without GPUs, where DeepSpeed runs on CPU over gloo). The model sizes come from
``examples/deepseek_v3``'s presets; the data is that recipe's Markov chain (generated from the seed, nothing is
downloaded). The one line that involves the plugin is ``ep_ds.initialize(...)`` (a drop-in for
``deepspeed.initialize``), which reads the config's ``"deepep_plugin"`` section and swaps the MoE layers.

Rank 0 logs the loss (mean over ranks) every ``--log-interval`` steps and, with ``--summary``, writes a JSON
summary (losses per step, config).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

from deepep_plugin import spawn  # noqa: E402
from deepep_plugin.integrations import deepspeed as ep_ds  # noqa: E402
from examples.deepseek_v3.configs import load_preset  # noqa: E402
from examples.deepseek_v3.data import MarkovCorpus  # noqa: E402
from examples.deepspeed.model import DeepSeekV3DeepSpeedModel  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deepspeed_config", default=os.path.join(HERE, "ds_config.json"),
                   help="DeepSpeed JSON config; its \"deepep_plugin\" section enables the plugin")
    p.add_argument("--preset", default="tiny", help="model preset of examples/deepseek_v3 (tiny, small, medium)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a model field")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--aux-loss-coef", type=float, default=0.01, help="weight of DeepSpeed's l_aux")
    p.add_argument("--ep-size", type=int, default=0, help="expert-parallel size (default: all ranks)")
    p.add_argument("--nprocs", type=int, default=0, help="processes to start without a launcher")
    p.add_argument("--log-interval", type=int, default=5)
    p.add_argument("--summary", default=None, help="write a JSON summary here (rank 0)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """Train on this process (``torch.distributed`` environment variables set); rank 0 returns the summary."""
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    overrides = dict(kv.split("=", 1) for kv in args.set)
    model_cfg, _ = load_preset(args.preset, overrides=overrides)
    ep_size = args.ep_size or world
    model = DeepSeekV3DeepSpeedModel(model_cfg, ep_size, rank % ep_size, args.seed, args.aux_loss_coef)

    engine, _, _, _ = ep_ds.initialize(model=model, model_parameters=model.parameters(),
                                       config=args.deepspeed_config)
    plugin_layers = sum(isinstance(m, ep_ds.DeepEPMOELayer) for m in engine.moe_layers)
    corpus = MarkovCorpus(model_cfg.vocab_size, args.seq_len, args.seed, 4)
    micro_batch = engine.train_micro_batch_size_per_gpu()
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        print(f"DeepSeek-V3-style MoE ({args.preset}): {model_cfg.num_layers} layers, hidden {model_cfg.hidden_size}, "
              f"{model_cfg.n_routed_experts} routed experts top-{model_cfg.num_experts_per_tok} + "
              f"{model_cfg.n_shared_experts} shared; {params / 1e6:.2f} M parameters on rank 0", flush=True)
        print(f"{world} ranks, EP {ep_size}, ZeRO stage {engine.zero_optimization_stage()}, device {engine.device}; "
              f"MoE layers on deepep_plugin: {plugin_layers}/{len(engine.moe_layers)}; "
              f"loss of a uniform guess {corpus.uniform_loss:.3f}, entropy floor {corpus.entropy:.3f}", flush=True)

    from examples.deepseek_v3.reporting import ProgressBar

    losses: List[float] = []
    start = time.time()
    bar = ProgressBar(args.steps, enabled=rank == 0, desc="train")  # a bar on a terminal, plain lines otherwise
    for step in range(args.steps):
        tokens = corpus.batch(step * world + rank, micro_batch).to(engine.device)
        loss, ce, l_aux = engine(tokens)
        engine.backward(loss)
        engine.step()
        logged = torch.stack([ce, l_aux]).float()
        dist.all_reduce(logged)
        logged /= world
        losses.append(logged[0].item())
        bar.update()
        bar.set_postfix(f"loss {losses[-1]:.4f}")
        if rank == 0 and (step % args.log_interval == 0 or step == args.steps - 1):
            bar.write(f"step {step + 1:4d}/{args.steps}  loss {losses[-1]:.4f}  l_aux {logged[1].item():.4f}  "
                      f"{(time.time() - start) / (step + 1) * 1e3:7.1f} ms/step")
    bar.close()
    if rank != 0:
        return None
    summary = {"losses": losses, "plugin_layers": plugin_layers, "moe_layers": len(engine.moe_layers),
               "world_size": world, "ep_size": ep_size, "seconds": time.time() - start,
               "deepspeed_config": ep_ds.load_ds_config(args.deepspeed_config)}
    print(f"done: loss {losses[0]:.3f} (step 1) -> {losses[-1]:.3f} (step {len(losses)}) "
          f"in {summary['seconds']:.1f} s", flush=True)
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def _spawned(rank: int, world: int, args: argparse.Namespace) -> None:
    run(args)  # the spawn helper set the torch.distributed environment; DeepSpeed joins the group


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if "RANK" in os.environ:  # started by a launcher (deepspeed, torchrun): this process is one rank
        run(args)
        return
    nprocs = args.nprocs or (torch.cuda.device_count() or 2)
    spawn.run(_spawned, nprocs, (args,), backend=None, threads=1, start_method="spawn")


if __name__ == "__main__":
    main(sys.argv[1:])
