"""Train the DeepSeek-V3-style example model with expert parallelism through ``deepep_plugin`` (plain PyTorch).

    python -m examples.deepseek_v3.train --preset tiny            # CPU: 2 processes, reference backend, ~1 min
    python -m examples.deepseek_v3.train --preset small           # GPUs: one process per GPU, CUDA kernels

The script starts its own processes (``--nprocs``; default: one per GPU, 2 on a machine with one GPU, or 2 on a
CPU-only machine) or runs as one rank of an outside launcher (``torchrun``: it finds ``RANK``/``WORLD_SIZE`` in the
environment).

Placement on GPUs: local rank ``r`` uses GPU ``r % G`` of the ``G`` GPUs in use (``--gpus``; default: all visible).
With one process per GPU the process group is NCCL. With more processes than GPUs (an EP run on a one-GPU
machine, or ``--gpus 1``) ranks share GPUs; NCCL refuses two ranks on one device, so the process group is then
gloo (which all-reduces CUDA tensors through host memory), while dispatch and combine still run on the
``deepep_plugin`` CUDA kernels (their buffers are mapped between the processes with CUDA IPC, exchanged over
gloo). Ranks on one GPU take turns on it, so their timings say nothing about one GPU per rank; the run says so.

Parallelism: the EP group is the whole world and is also the data-parallel group. Each rank reads different
batches, holds ``E / R`` routed experts and a copy of every other parameter.

Gradient convention: the objective is the mean over ranks of each rank's mean token loss,
``L = (1/R) sum_r L_r`` (ranks have equal token counts, so this is the mean over all tokens). Replicated
parameters: each rank's backward gives ``dL_r/dw``; their average over ranks (one all-reduce) is ``dL/dw``.
Routed experts: combine's backward brings every source rank's gradient to the owner, so the owner's backward
gives ``sum_r dL_r/dw`` and is divided by ``R``. Every gradient is then exactly that of the single-process model
on the union of the ranks' batches, and gradient-norm clipping uses the global norm.

Printed every ``log_interval`` steps by rank 0: the loss (mean over ranks), tokens/s (all ranks), the seconds per
step spent in dispatch and combine (forward + backward, summed over MoE layers, this rank) and the expert load
balance (most loaded expert / mean, mean over MoE layers). At the end: first and last loss, the held-out loss
against the data's entropy floor, and ``loss_curve.png`` + ``summary.json`` in ``--out-dir``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a file: python examples/deepseek_v3/train.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    __package__ = "examples.deepseek_v3"

import torch
import torch.distributed as dist

import deepep_plugin
from deepep_plugin import spawn
from deepep_plugin.errors import expect

from .configs import PRESETS, ModelConfig, TrainConfig, load_preset
from .data import MarkovCorpus
from .model import DeepSeekV3Model, ExpertParallel
from .reporting import ProgressBar, save_loss_curve
from .timing import CommTimer


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m examples.deepseek_v3.train", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model and run sizes (configs.py)")
    p.add_argument("--config", default=None, help="JSON file of field overrides, applied after the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override one model or train field, e.g. --set n_routed_experts=32 (repeatable)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="sequences per rank per step")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--log-interval", type=int, default=None, help="steps between log lines")
    p.add_argument("--fp8-dispatch", action="store_true", help="send tokens as FP8 in dispatch (hidden %% 128 == 0)")
    p.add_argument("--sync-free", action="store_true",
                   help="MoE layers read nothing from the GPU: dispatch padded to the worst case (tokens x ranks), "
                        "a static permutation, device-side expert counts with grouped GEMM experts")
    p.add_argument("--nprocs", type=int, default=None,
                   help="processes (EP ranks); default: one per GPU in use (at least 2), or 2 on the CPU")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--gpus", type=int, default=None,
                   help="GPUs to use (default: all visible); rank r uses GPU r %% gpus, so nprocs > gpus shares them")
    p.add_argument("--dist-backend", default="auto", choices=["auto", "nccl", "gloo"],
                   help="torch.distributed backend (auto: NCCL with one GPU per process, gloo on shared GPUs and "
                        "on the CPU)")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "cuda"],
                   help="deepep_plugin backend (sets DEEPEP_PLUGIN_BACKEND; auto = fastest that applies)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads per process (default 1: the tiny model gains little from more, and OpenMP "
                        "threads on a busy machine slow it down a lot)")
    p.add_argument("--out-dir", default=None, help="where loss_curve.png and summary.json go "
                                                   "(default: runs/deepseek_v3_<preset>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--start-method", default=None, choices=["fork", "spawn"],
                   help="process start method (default: fork on CPU, spawn with CUDA)")
    return p.parse_args(argv)


def build_configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    overrides: Dict[str, Any] = {}
    for item in args.overrides:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects FIELD=VALUE, got {item!r}")
        overrides[name.strip()] = value.strip()
    for name in ("steps", "batch_size", "seq_len", "lr", "seed", "log_interval"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.fp8_dispatch:
        overrides["fp8_dispatch"] = True
    return load_preset(args.preset, args.config, overrides)


# --------------------------------------------------------------------------------------------------------------
# Placement of the ranks
@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the ``nprocs`` processes of this host run.

    Attributes:
        nprocs: processes (EP ranks) on this host.
        num_gpus: GPUs in use, ``0`` on the CPU; local rank ``r`` uses GPU ``r % num_gpus``.
        dist_backend: ``"nccl"`` or ``"gloo"``, the ``torch.distributed`` backend of the process group.
    """

    nprocs: int
    num_gpus: int
    dist_backend: str

    @property
    def shares_gpus(self) -> bool:
        """True when some GPU runs more than one rank."""
        return 0 < self.num_gpus < self.nprocs

    def gpu_of(self, local_rank: int) -> int:
        """The GPU index of local rank ``local_rank`` (GPU placement only)."""
        expect(self.num_gpus > 0, "Placement.gpu_of: this placement has no GPUs")
        return local_rank % self.num_gpus

    def describe(self) -> str:
        """One line for the run's header."""
        if self.num_gpus == 0:
            return f"{self.nprocs} CPU processes, {self.dist_backend} process group"
        if not self.shares_gpus:
            return f"{self.nprocs} processes, one GPU each, {self.dist_backend} process group"
        return (f"{self.nprocs} processes sharing {self.num_gpus} GPU{'s' if self.num_gpus > 1 else ''} "
                f"(rank r on GPU r % {self.num_gpus}), {self.dist_backend} process group")


def plan_placement(device: str, visible_gpus: int, nprocs: Optional[int] = None, gpus: Optional[int] = None,
                   dist_backend: str = "auto") -> Placement:
    """Choose processes, GPUs and process-group backend from the command line (``SystemExit`` on a bad choice).

    Args:
        device: ``"cpu"`` or ``"cuda"``.
        visible_gpus: ``torch.cuda.device_count()``.
        nprocs: processes asked for (``None``: one per GPU in use, but at least 2 -- an EP run on one GPU needs
            two ranks -- or 2 on the CPU).
        gpus: GPUs asked for (``None``: all visible).
        dist_backend: ``"auto"``, ``"nccl"`` or ``"gloo"``.
    """
    if nprocs is not None and nprocs < 1:
        raise SystemExit(f"--nprocs must be >= 1, got {nprocs}")
    if device == "cpu":
        if gpus:
            raise SystemExit("--gpus applies to --device cuda only")
        if dist_backend == "nccl":
            raise SystemExit("--dist-backend nccl needs GPUs; the CPU run uses gloo")
        return Placement(nprocs or 2, 0, "gloo")
    if visible_gpus < 1:
        raise SystemExit("--device cuda: no CUDA GPU is visible")
    if gpus is not None and not 1 <= gpus <= visible_gpus:
        raise SystemExit(f"--gpus must be in [1, {visible_gpus}] (the visible GPUs), got {gpus}")
    usable = gpus or visible_gpus
    nprocs = nprocs or max(usable, 2)
    num_gpus = min(usable, nprocs)
    shared = nprocs > num_gpus
    if dist_backend == "auto":
        dist_backend = "gloo" if shared else "nccl"
    elif dist_backend == "nccl" and shared:
        raise SystemExit(f"--dist-backend nccl needs one GPU per process, but {nprocs} processes share "
                         f"{num_gpus} GPU(s); use --dist-backend gloo (or auto)")
    return Placement(nprocs, num_gpus, dist_backend)


# --------------------------------------------------------------------------------------------------------------
# Distributed helpers
def make_buffer(group: dist.ProcessGroup, hidden: int, comm_dtype: torch.dtype) -> "deepep_plugin.Buffer":
    """A normal-mode ``Buffer`` for the EP group sized for dispatch and combine of ``hidden``-wide rows (at least
    2 bytes per element so FP8 and BF16 share it), with RDMA bytes when the group spans nodes."""
    hidden_bytes = hidden * max(torch.empty(0, dtype=comm_dtype).element_size(), 2)
    return deepep_plugin.Buffer.sized_for(group, hidden_bytes)


def sync_gradients(model: DeepSeekV3Model, world_size: int, group: Optional[dist.ProcessGroup] = None) -> None:
    """Apply the gradient convention (module docstring): average replicated gradients over the group in one
    all-reduce, divide expert gradients by the group size."""
    if world_size == 1:
        return
    replicated = [p for p in model.replicated_parameters() if p.requires_grad]
    for p in replicated:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in replicated])
    dist.all_reduce(flat, group=group)
    flat.div_(world_size)
    offset = 0
    for p in replicated:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p))
        offset += n
    for p in model.expert_parameters():
        if p.grad is not None:
            p.grad.div_(world_size)


def clip_global_grad_norm(model: DeepSeekV3Model, max_norm: float, world_size: int,
                          group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Clip all gradients by the norm of the *global* gradient (replicated gradients counted once, every rank's
    experts included); return that norm (float32 scalar tensor, no host sync). Call after :func:`sync_gradients`."""
    def sq(params: Any) -> torch.Tensor:
        grads = [p.grad.float().pow(2).sum() for p in params if p.grad is not None]
        return torch.stack(grads).sum() if grads else torch.zeros((), device=model.head.weight.device)

    expert_sq = sq(model.expert_parameters())
    if world_size > 1:
        dist.all_reduce(expert_sq, group=group)
    norm = (sq(model.replicated_parameters()) + expert_sq).sqrt()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale.to(p.grad.dtype))
    return norm


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: DeepSeekV3Model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices (and stacked expert matrices) only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


# --------------------------------------------------------------------------------------------------------------
# One rank
def run_rank(rank: int, world_size: int, model_cfg: ModelConfig, train_cfg: TrainConfig,
             options: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Train on this rank of an initialised default process group; rank 0 returns the run's summary."""
    on_gpu = options["device"] == "cuda"
    placement: Placement = options["placement"]
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", placement.gpu_of(local_rank)) if on_gpu else torch.device("cpu")
    group = dist.group.WORLD
    comm_dtype = torch.bfloat16 if on_gpu else torch.float32
    timer = CommTimer(device)
    buffer = make_buffer(group, model_cfg.hidden_size, comm_dtype)
    ep = ExpertParallel(buffer=buffer, rank=rank, size=world_size, timer=timer, comm_dtype=comm_dtype,
                        sync_free=options.get("sync_free", False))
    model = DeepSeekV3Model(model_cfg, ep, seed=train_cfg.seed).to(device)
    optimizer = make_optimizer(model, train_cfg)
    corpus = MarkovCorpus(model_cfg.vocab_size, train_cfg.seq_len, train_cfg.seed, train_cfg.markov_branching)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_gpu else contextlib.nullcontext
    is_main = rank == 0
    tokens_per_step = world_size * train_cfg.batch_size * train_cfg.seq_len

    if is_main:
        if placement.shares_gpus:
            print(f"NOTE: {placement.nprocs} ranks share {placement.num_gpus} GPU(s) (rank r on GPU r % "
                  f"{placement.num_gpus}), over a gloo process group (NCCL needs one GPU per rank). The ranks take "
                  "turns on each GPU: losses are exact, but tokens/s and dispatch/combine times are NOT "
                  "representative of one GPU per rank.", flush=True)
        n_rep = sum(p.numel() for p in model.replicated_parameters())
        n_exp = sum(p.numel() for p in model.expert_parameters())
        backend_name = getattr(buffer, "backend_name", None) or getattr(getattr(buffer, "backend", None), "name", "?")
        print(f"DeepSeek-V3-style MoE, preset {options['preset']!r}: {model_cfg.num_layers} layers "
              f"({model_cfg.num_moe_layers} MoE), hidden {model_cfg.hidden_size}, {model_cfg.n_routed_experts} routed "
              f"experts (top-{model_cfg.num_experts_per_tok} within {model_cfg.topk_group}/{model_cfg.n_group} groups) "
              f"+ {model_cfg.n_shared_experts} shared", flush=True)
        where = f" ({placement.describe()})" if on_gpu else ""
        print(f"EP {world_size} ranks on {device.type}{where}, deepep_plugin backend {backend_name}, dispatch "
              f"{'FP8' if model_cfg.fp8_dispatch else str(comm_dtype).replace('torch.', '')}; parameters: "
              f"{n_rep / 1e6:.2f} M replicated + {n_exp / 1e6:.2f} M experts per rank "
              f"({n_exp * world_size / 1e6:.2f} M in all); {tokens_per_step} tokens per step", flush=True)
        print(f"data: Markov chain over {model_cfg.vocab_size} tokens; loss of a uniform guess "
              f"{corpus.uniform_loss:.3f}, entropy floor {corpus.entropy:.3f} nats/token", flush=True)

    bar = ProgressBar(train_cfg.steps, enabled=is_main and not options["no_progress"], desc="train")
    losses: List[float] = []
    pending: List[torch.Tensor] = []
    history: List[Dict[str, float]] = []
    comm_total = {"dispatch": 0.0, "combine": 0.0}
    timed_time, timed_tokens = 0.0, 0
    balance = float("nan")
    t_run = t_interval = time.perf_counter()
    interval_steps = 0
    for step in range(train_cfg.steps):
        for group_ in optimizer.param_groups:
            group_["lr"] = lr_at(step, train_cfg)
        tokens = corpus.batch(step * world_size + rank, train_cfg.batch_size).to(device, non_blocking=True)
        with autocast():
            loss = model.loss(tokens)
        loss.backward()
        sync_gradients(model, world_size)
        grad_norm = clip_global_grad_norm(model, train_cfg.grad_clip, world_size)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        counts = model.update_expert_biases()
        pending.append(loss.detach())
        interval_steps += 1
        bar.update()
        last = step == train_cfg.steps - 1
        if (step + 1) % train_cfg.log_interval == 0 or last or step == 0:
            step_losses = torch.stack(pending).float()
            dist.all_reduce(step_losses)
            step_losses = (step_losses / world_size).tolist()  # also waits for the device
            losses.extend(step_losses)
            pending.clear()
            now = time.perf_counter()
            elapsed, t_interval = now - t_interval, now
            comm = timer.collect()
            dispatch_s = (comm.get("dispatch/fwd", 0.0) + comm.get("dispatch/bwd", 0.0)) / interval_steps
            combine_s = (comm.get("combine/fwd", 0.0) + comm.get("combine/bwd", 0.0)) / interval_steps
            if counts is not None:
                balance = float((counts.max(dim=1).values / counts.mean(dim=1)).mean())
            tok_s = tokens_per_step * interval_steps / elapsed
            if step > 0:  # the first step includes one-time warm-up; keep it out of the averages
                timed_time += elapsed
                timed_tokens += tokens_per_step * interval_steps
                comm_total["dispatch"] += dispatch_s * interval_steps
                comm_total["combine"] += combine_s * interval_steps
            record = {"step": step + 1, "loss": step_losses[-1], "tokens_per_s": tok_s,
                      "dispatch_ms": 1e3 * dispatch_s, "combine_ms": 1e3 * combine_s,
                      "step_ms": 1e3 * elapsed / interval_steps, "max_over_mean_load": balance,
                      "grad_norm": float(grad_norm), "lr": lr_at(step, train_cfg)}
            history.append(record)
            interval_steps = 0
            if is_main:
                bar.set_postfix(f"loss {record['loss']:.3f}")
                bar.write(f"step {step + 1:5d}/{train_cfg.steps}  loss {record['loss']:.4f}  "
                          f"{tok_s:9.0f} tok/s  step {record['step_ms']:7.1f} ms  "
                          f"dispatch {record['dispatch_ms']:6.2f} ms  combine {record['combine_ms']:6.2f} ms  "
                          f"load max/mean {balance:.2f}  grad norm {record['grad_norm']:.2f}")
    bar.close()
    wall = time.perf_counter() - t_run

    eval_loss = evaluate(model, corpus, train_cfg, rank, world_size, device, autocast)
    if not is_main:
        return None
    n_timed_steps = max(train_cfg.steps - 1, 1)
    summary = {
        "preset": options["preset"], "world_size": world_size, "device": device.type,
        "num_gpus": placement.num_gpus, "ranks_share_gpus": placement.shares_gpus,
        "dist_backend": placement.dist_backend,
        "backend": getattr(buffer, "backend_name", None) or getattr(getattr(buffer, "backend", None), "name", "?"),
        "fp8_dispatch": model_cfg.fp8_dispatch, "steps": train_cfg.steps, "tokens_per_step": tokens_per_step,
        "first_loss": losses[0], "last_loss": sum(losses[-5:]) / len(losses[-5:]), "eval_loss": eval_loss,
        "entropy_floor": corpus.entropy, "uniform_loss": corpus.uniform_loss, "wall_s": wall,
        "tokens_per_s": timed_tokens / timed_time if timed_time > 0 else float("nan"),
        "dispatch_ms_per_step": 1e3 * comm_total["dispatch"] / n_timed_steps,
        "combine_ms_per_step": 1e3 * comm_total["combine"] / n_timed_steps,
        "losses": losses, "history": history,
        "model": dataclasses.asdict(model_cfg), "train": dataclasses.asdict(train_cfg),
    }
    out_dir = options["out_dir"]
    os.makedirs(out_dir, exist_ok=True)
    png = os.path.join(out_dir, "loss_curve.png")
    how = save_loss_curve(png, losses, corpus.entropy,
                          f"DeepSeek-V3-style MoE ({options['preset']}), EP{world_size} via deepep_plugin")
    summary["loss_curve_png"] = png
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"done in {wall:.1f} s: loss {summary['first_loss']:.3f} (step 1) -> {summary['last_loss']:.3f} "
          f"(mean of the last 5 steps); held-out loss {eval_loss:.3f} (entropy floor {corpus.entropy:.3f})", flush=True)
    print(f"throughput {summary['tokens_per_s']:.0f} tokens/s; per step: dispatch "
          f"{summary['dispatch_ms_per_step']:.2f} ms, combine {summary['combine_ms_per_step']:.2f} ms "
          f"(forward + backward, all MoE layers, rank 0)"
          + (" -- ranks share GPUs: not representative of one GPU per rank" if placement.shares_gpus else ""),
          flush=True)
    print(f"loss curve: {png}" + ("" if how == "matplotlib" else " (plain chart; pip install matplotlib for labels)")
          + f"; summary: {os.path.join(out_dir, 'summary.json')}", flush=True)
    return summary


@torch.no_grad()
def evaluate(model: DeepSeekV3Model, corpus: MarkovCorpus, cfg: TrainConfig, rank: int, world_size: int,
             device: torch.device, autocast: Any) -> float:
    """Mean loss over ``cfg.eval_batches`` held-out batches per rank, averaged over ranks."""
    model.eval()
    total = torch.zeros((), device=device)
    for i in range(cfg.eval_batches):
        tokens = corpus.batch(i * world_size + rank, cfg.batch_size, stream="eval").to(device)
        with autocast():
            total += model.loss(tokens).float()
    dist.all_reduce(total)
    model.train()
    return float(total) / (cfg.eval_batches * world_size)


# --------------------------------------------------------------------------------------------------------------
# Processes
def _run_initialised(rank: int, world_size: int, model_cfg: ModelConfig, train_cfg: TrainConfig,
                     options: Dict[str, Any]) -> None:
    if options["backend"] != "auto":
        os.environ["DEEPEP_PLUGIN_BACKEND"] = options["backend"]
    placement: Placement = options["placement"]
    if options["device"] == "cuda":
        gpu = placement.gpu_of(int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(gpu)
        if placement.dist_backend == "nccl":
            dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=torch.device("cuda", gpu))
        else:  # ranks share GPUs (or gloo was asked for): gloo all-reduces CUDA tensors through host memory
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
    else:
        torch.set_num_threads(options["threads"])
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        run_rank(rank, world_size, model_cfg, train_cfg, options)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv: Optional[Sequence[str]] = None) -> Optional[Dict[str, Any]]:
    """Run the recipe; return rank 0's summary (``None`` on other ranks of an outside launcher)."""
    args = parse_args(argv)
    model_cfg, train_cfg = build_configs(args)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and args.backend == "cuda":
        raise SystemExit("--backend cuda needs GPUs (--device cuda); on the CPU use --backend reference or auto")
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    visible_gpus = torch.cuda.device_count() if device == "cuda" else 0
    if launched:  # the launcher chose the processes; this host runs LOCAL_WORLD_SIZE of them
        world_size = int(os.environ["WORLD_SIZE"])
        local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        placement = plan_placement(device, visible_gpus, local_procs, args.gpus, args.dist_backend)
    else:
        placement = plan_placement(device, visible_gpus, args.nprocs, args.gpus, args.dist_backend)
        world_size = placement.nprocs
    if model_cfg.n_routed_experts % world_size:
        raise SystemExit(f"the number of processes must divide n_routed_experts ({model_cfg.n_routed_experts}), "
                         f"got {world_size}")
    out_dir = args.out_dir or os.path.join("runs", f"deepseek_v3_{args.preset}")
    options = {"preset": args.preset, "device": device, "backend": args.backend, "out_dir": out_dir,
               "no_progress": args.no_progress, "sync_free": args.sync_free, "threads": args.threads,
               "placement": placement}
    if launched:
        rank = int(os.environ["RANK"])
        _run_initialised(rank, world_size, model_cfg, train_cfg, options)
        return _read_summary(out_dir) if rank == 0 else None
    summary_path = os.path.join(out_dir, "summary.json")
    if os.path.exists(summary_path):
        os.remove(summary_path)
    # Fork is quick, but CUDA (and autograd's device threads) cannot cross it: spawn on GPUs, or when this process
    # has already used CUDA (e.g. inside a test session).
    start_method = args.start_method or ("spawn" if device == "cuda" or torch.cuda.is_initialized() else "fork")
    # The ranks' environment (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK) comes from the spawn helper;
    # _run_initialised joins the process group itself, as it does under an outside launcher.
    spawn.run(_run_initialised, placement.nprocs, (model_cfg, train_cfg, options), backend=None,
              start_method=start_method)
    return _read_summary(out_dir)


def _read_summary(out_dir: str) -> Dict[str, Any]:
    with open(os.path.join(out_dir, "summary.json")) as f:
        return json.load(f)


if __name__ == "__main__":
    main()
