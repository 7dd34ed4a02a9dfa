"""Self-distillation training of early-exit networks (and the shared training loop).

Loss per batch ("Be Your Own Teacher", as used by ESCEPE): at every exit
cross-entropy with the labels; at every shallow exit also KL divergence from
the deepest exit's softened output (temperature T, scaled by T^2), and an
optional L2 feature hint towards the deepest exit's pooled features. With a
`teacher`, the same KD term pulls every exit toward the teacher's matching exit
instead: that is the retraining step of section-wise compression.

Checkpoints are written atomically every epoch; `resume=True` continues from
the last one exactly (model, optimiser, schedule, RNG, history).
Under `torchrun` the model is wrapped in DistributedDataParallel (gloo on CPU).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from compiler.atomic import atomic_path

log = logging.getLogger("escepe.train")


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    temperature: float = 3.0
    kd_weight: float = 0.5  # alpha: share of the KD term at shallow exits (1 - alpha for CE)
    hint_weight: float = 0.0  # lambda: feature-hint L2 weight (0 = off)
    seed: int = 0
    max_steps_per_epoch: int | None = None  # for quick runs and tests


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)  # per epoch: loss, per-exit val acc


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_distributed() -> bool:
    """Join the process group that `torchrun` describes in the environment, if any.

    gloo on CPU (what the tests use), nccl when CUDA is available.
    """
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    log.info("rank %d of %d (%s)", rank(), world_size(), backend)
    return True


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """KL(teacher_T || student_T) * T^2, averaged over the batch."""
    return F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.softmax(teacher_logits.detach() / t, dim=1),
        reduction="batchmean",
    ) * (t * t)


def self_distillation_loss(
    logits: list[torch.Tensor],
    features: list[torch.Tensor] | None,
    targets: torch.Tensor,
    cfg: TrainConfig,
    teacher_logits: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    deepest = len(logits) - 1
    total = logits[0].new_zeros(())
    for i, out in enumerate(logits):
        ce = F.cross_entropy(out, targets)
        if teacher_logits is not None:
            soft = teacher_logits[i]
        elif i < deepest:
            soft = logits[deepest]
        else:
            total = total + ce  # the deepest exit learns from the labels alone
            continue
        total = (
            total + (1 - cfg.kd_weight) * ce + cfg.kd_weight * kd_loss(out, soft, cfg.temperature)
        )
        if cfg.hint_weight and features is not None and i < deepest:
            total = total + cfg.hint_weight * F.mse_loss(features[i], features[deepest].detach())
    return total


@torch.no_grad()
def _average_buffers(model: nn.Module) -> None:
    """DDP keeps each rank's BN running stats from its own last batches: average them,
    so that every rank (and the checkpoint) holds the same model."""
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf /= world_size()
        else:
            dist.broadcast(buf, 0)


@torch.no_grad()
def evaluate(model: nn.Module, loader, max_batches: int | None = None) -> dict:
    """Per-exit accuracy and the ensemble (mean of exit softmaxes) accuracy, in %."""
    model.eval()
    correct, ensemble, n = None, 0, 0
    for b, (x, y) in enumerate(loader):
        if max_batches is not None and b >= max_batches:
            break
        outs = model(x)
        hits = torch.stack([(o.argmax(1) == y).sum() for o in outs])
        correct = hits if correct is None else correct + hits
        probs = torch.stack([F.softmax(o, 1) for o in outs]).mean(0)
        ensemble += int((probs.argmax(1) == y).sum())
        n += len(y)
    if not n:
        return {"per_exit": [], "ensemble": 0.0, "samples": 0}
    return {
        "per_exit": [100.0 * float(c) / n for c in correct],
        "ensemble": 100.0 * ensemble / n,
        "samples": n,
    }


def save_checkpoint(path: str, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def fit(
    model: nn.Module,
    make_train_loader: Callable[[int], object],
    val_loader,
    cfg: TrainConfig,
    checkpoint: str | None = None,
    resume: bool = False,
    teacher: nn.Module | None = None,
    params: list[nn.Parameter] | None = None,
    desc: str = "train",
) -> History:
    """Train `model` for cfg.epochs; make_train_loader(epoch) gives that epoch's loader.

    params: what the optimiser updates (default: all trainable parameters).
    teacher: an uncompressed model to distil from (section-wise retraining).
    """
    torch.manual_seed(cfg.seed)
    params = [p for p in (params or model.parameters()) if p.requires_grad]
    opt = torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
    )
    steps = cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda e: 0.5 * (1 + math.cos(math.pi * min(e, steps) / max(steps, 1)))
    )
    history, start = History(), 0
    if resume and checkpoint and os.path.exists(checkpoint):
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        history = History(state["history"])
        start = state["epoch"]
        log.info("resumed %s from %s at epoch %d", desc, checkpoint, start)
    if teacher is not None:
        teacher.eval()
    # Feature hints need forward_with_features, which DDP does not wrap: under
    # DDP training runs without hints.
    want_features = cfg.hint_weight > 0 and hasattr(model, "forward_with_features")
    train_model = model
    if is_distributed():
        train_model = nn.parallel.DistributedDataParallel(model)
    for epoch in range(start, cfg.epochs):
        model.train()
        loader = make_train_loader(epoch)
        total = len(loader)
        if cfg.max_steps_per_epoch:
            total = min(total, cfg.max_steps_per_epoch)
        bar = tqdm(
            total=total,
            desc=f"{desc} {epoch + 1}/{cfg.epochs}",
            disable=rank() != 0,
            leave=False,
            mininterval=1.0,
        )
        running, seen, hits = 0.0, 0, 0
        for step, (x, y) in enumerate(loader):
            if step >= total:
                break
            if want_features and train_model is model:
                logits, feats = model.forward_with_features(x)
            else:
                logits, feats = train_model(x), None
            t_logits = None
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(x)
            loss = self_distillation_loss(logits, feats, y, cfg, t_logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.item() * len(y)
            seen += len(y)
            hits += int((logits[-1].argmax(1) == y).sum())
            bar.set_postfix(loss=f"{running / seen:.3f}", acc=f"{100 * hits / seen:.1f}")
            bar.update()
        bar.close()
        sched.step()
        if is_distributed():
            _average_buffers(model)
        metrics = evaluate(model, val_loader) if val_loader is not None else {}
        record = {
            "epoch": epoch + 1,
            "loss": running / max(seen, 1),
            "train_acc_last_exit": 100 * hits / max(seen, 1),
            **metrics,
        }
        history.epochs.append(record)
        if rank() == 0:
            log.info(
                "%s epoch %d: loss %.4f val per-exit %s ensemble %.2f",
                desc,
                epoch + 1,
                record["loss"],
                [round(a, 2) for a in metrics.get("per_exit", [])],
                metrics.get("ensemble", float("nan")),
            )
            if checkpoint:
                save_checkpoint(
                    checkpoint,
                    {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "rng": torch.get_rng_state(),
                        "history": history.epochs,
                        "epoch": epoch + 1,
                        "config": asdict(cfg),
                    },
                )
    return history
