"""The whole ESCEPE recipe, stage by stage, from one config; every stage resumes.

    train -> compress (section-wise clustering + KD) -> export -> calibrate -> eval

Each stage leaves its artefact in the run folder (trained.pt, compressed.pt,
model.escepe, results.json); running again skips finished stages and resumes a
stage that was interrupted from its last checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from compiler import calibrate as calib
from compiler import cluster, data, export, models, train
from compiler.graph import capture

log = logging.getLogger("escepe.pipeline")


@dataclass
class PipelineConfig:
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    model: str = "resnet18"
    model_args: dict = field(default_factory=lambda: {"width": 16, "exits": [1, 2, 3]})
    val_fraction: float = 0.1
    seed: int = 0
    train: dict = field(default_factory=lambda: {"epochs": 3})
    # clusters: one int for all sections or one per section; mode: "sectionwise"
    # (cluster one section at a time, retrain after each) or "uniform" (all at once);
    # kd: distil from the uncompressed model while retraining; prune: share of
    # each section's weights sent to a fixed zero centroid (one value or per section);
    # channel_dtype: "f16" stores per-channel scale/shift as binary16 (format 1.2).
    compress: dict = field(
        default_factory=lambda: {
            "clusters": [32, 16, 8, 4],
            "mode": "sectionwise",
            "kd": True,
            "epochs_per_section": 1,
            "lr": 0.01,
        }
    )
    calibrate: dict = field(default_factory=lambda: {"max_acc_drop": 1.0})
    limit_train: int | None = None  # use only the first N training images (quick runs)
    limit_eval: int | None = None

    @classmethod
    def from_file(cls, path: str) -> PipelineConfig:
        with open(path) as f:
            raw = json.load(f)
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown config keys {sorted(unknown)}")
        return cls(**raw)


class Run:
    """A run folder and the data/model it works on."""

    def __init__(self, cfg: PipelineConfig, run_dir: str):
        self.cfg = cfg
        self.dir = run_dir
        os.makedirs(run_dir, exist_ok=True)
        with open(self.path("config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)
        full = data.load_dataset(cfg.dataset, root=cfg.data_root, split="train")
        if cfg.limit_train:
            full = full.subset(np.arange(min(cfg.limit_train, len(full))))
        self.train_set, self.val_set = data.train_val_split(full, cfg.val_fraction, cfg.seed)
        self.test_set = data.load_dataset(cfg.dataset, root=cfg.data_root, split="test")
        if cfg.limit_eval:
            self.test_set = self.test_set.subset(np.arange(min(cfg.limit_eval, len(self.test_set))))
        self.mean, self.std = data.channel_stats(self.train_set)
        self.classes = self.train_set.classes
        c, h, w = self.train_set.image_shape
        self.example = torch.zeros(1, c, h, w)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def new_model(self) -> torch.nn.Module:
        c = self.train_set.image_shape[0]
        return models.build_model(
            self.cfg.model, num_classes=len(self.classes), in_channels=c, **self.cfg.model_args
        )

    def loader(self, ds, train_mode: bool, batch_size: int, epoch: int = 0):
        if train_mode and train.world_size() > 1:  # DDP: each rank trains on its own shard
            ds = ds.subset(np.arange(train.rank(), len(ds), train.world_size()))
        return data.make_loader(
            ds, self.mean, self.std, batch_size, train=train_mode, seed=self.cfg.seed + epoch
        )

    def fit(self, model, tcfg: train.TrainConfig, checkpoint: str, **kw):
        return train.fit(
            model,
            lambda e: self.loader(self.train_set, True, tcfg.batch_size, e),
            self.loader(self.val_set, False, 256),
            tcfg,
            checkpoint=checkpoint,
            resume=True,
            **kw,
        )

    def load(self, name: str) -> torch.nn.Module:
        model = self.new_model()
        model.load_state_dict(torch.load(self.path(name), map_location="cpu", weights_only=True))
        return model.eval()


def stage_train(run: Run) -> torch.nn.Module:
    if os.path.exists(run.path("trained.pt")):
        log.info("train: done (%s)", run.path("trained.pt"))
        return run.load("trained.pt")
    torch.manual_seed(run.cfg.seed)
    model = run.new_model()
    tcfg = train.TrainConfig(seed=run.cfg.seed, **run.cfg.train)
    hist = run.fit(model, tcfg, run.path("train_ckpt.pt"), desc="train")
    if train.rank() == 0:
        _save_json(run.path("train_history.json"), hist.epochs)
        export.atomic_write(run.path("trained.pt"), _state_bytes(model))
    if train.is_distributed():
        torch.distributed.barrier()  # the other ranks wait for trained.pt
    return model.eval()


def stage_compress(run: Run, teacher: torch.nn.Module) -> torch.nn.Module:
    """Section-wise (or uniform) clustering with (or without) KD retraining."""
    if os.path.exists(run.path("compressed.pt")):
        log.info("compress: done (%s)", run.path("compressed.pt"))
        return run.load("compressed.pt")
    ccfg = run.cfg.compress
    model = copy.deepcopy(teacher)
    graph = capture(model, run.example)
    ks = cluster.per_section(ccfg["clusters"], graph.num_sections)
    prune = ccfg.get("prune", 0.0)
    prune = [float(prune)] * graph.num_sections if np.isscalar(prune) else list(prune)
    if len(prune) != graph.num_sections:
        raise ValueError(f"compress.prune needs {graph.num_sections} values (one per section)")
    order = (
        [list(range(graph.num_sections))]
        if ccfg.get("mode") == "uniform"
        else [[s] for s in range(graph.num_sections)]
    )
    tcfg = train.TrainConfig(
        seed=run.cfg.seed,
        epochs=ccfg.get("epochs_per_section", 1),
        lr=ccfg.get("lr", 0.01),
        weight_decay=0.0,
        # Batch size, temperature, etc. as in training unless the compress
        # section overrides them.
        **{
            k: v
            for k, v in {**run.cfg.train, **ccfg}.items()
            if k in ("batch_size", "max_steps_per_epoch", "temperature", "kd_weight")
        },
    )
    centroids = []
    for stage, sections in enumerate(order):
        for s in sections:
            centroids.append(
                cluster.attach_codebook(
                    model, graph, s, ks[s], seed=run.cfg.seed, zero_fraction=prune[s]
                )
            )
        ckpt = run.path(f"compress_stage{stage}.pt")
        done = run.path(f"compress_stage{stage}.done")
        if os.path.exists(done):
            model.load_state_dict(torch.load(done, map_location="cpu", weights_only=True))
            continue
        if tcfg.epochs > 0:
            run.fit(
                model,
                tcfg,
                ckpt,
                teacher=teacher if ccfg.get("kd", True) else None,
                params=cluster.trainable_after_clustering(model, centroids),
                desc=f"compress sections {sections}",
            )
        export.atomic_write(done, _state_bytes(model))
    cluster.bake_codebooks(model)
    export.atomic_write(run.path("compressed.pt"), _state_bytes(model))
    return model.eval()


def runtime_logits(model, ds) -> list[np.ndarray]:
    """Every exit's logits for a dataset; `model` is an escepe_rt.Model or a file path."""
    import escepe_rt

    m = escepe_rt.load(model, decode="eager") if isinstance(model, (str, os.PathLike)) else model
    return m.run_all_exits(m.preprocess(ds.images.transpose(0, 2, 3, 1)))


def stage_export(run: Run, model: torch.nn.Module, output: str) -> dict:
    """Export, calibrate thresholds on the validation split via the runtime, re-export."""
    import escepe_rt

    kw = dict(
        clusters=run.cfg.compress["clusters"],
        labels=run.classes,
        input_mean=run.mean,
        input_std=run.std,
        channel_dtype=run.cfg.compress.get("channel_dtype", "f32"),
        metadata={
            "dataset": run.cfg.dataset,
            "model": run.cfg.model,
            "recipe": json.dumps(asdict(run.cfg)),
        },
    )
    export.export(model, run.example, output, **kw)
    info = escepe_rt.load(output).info
    macs = [e["macs"] for e in info["exits"]]
    outcome = calib.calibrate(
        runtime_logits(output, run.val_set), run.val_set.labels, macs, **run.cfg.calibrate
    )
    log.info(
        "calibrated thresholds %s: val accuracy %.2f%%, %.1f%% of full MACs",
        [round(t, 4) for t in outcome.thresholds],
        outcome.accuracy,
        100 * outcome.avg_macs / macs[-1],
    )
    report = export.export(model, run.example, output, thresholds=outcome.thresholds, **kw)
    return {"report": report, "calibration": asdict(outcome)}


def evaluate_file(path: str, ds) -> dict:
    """Accuracy per exit, ensemble, and with the stored exit policy, via the runtime."""
    import escepe_rt

    m = escepe_rt.load(path)
    logits = runtime_logits(m, ds)
    labels = ds.labels
    per_exit = [100.0 * float((np.argmax(lg, 1) == labels).mean()) for lg in logits]
    probs = np.mean([_softmax(lg) for lg in logits], axis=0)
    info = m.info
    macs = np.array([e["macs"] for e in info["exits"]], dtype=np.float64)
    conf = np.stack([m.confidence(lg) for lg in logits], 1)
    correct = np.stack([np.argmax(lg, 1) == labels for lg in logits], 1)
    outcome = calib.simulate(conf, correct, macs, m.thresholds)
    with open(path, "rb") as f:
        blob = f.read()
    fp32 = info.get("fp32_param_bytes", 0)
    return {
        "file": path,
        "samples": int(len(labels)),
        "per_exit_accuracy": per_exit,
        "ensemble_accuracy": 100.0 * float((probs.argmax(1) == labels).mean()),
        "early_exit_accuracy": outcome.accuracy,
        "thresholds": m.thresholds,
        "exit_fraction": outcome.exit_fraction,
        "avg_macs": outcome.avg_macs,
        "full_macs": float(macs[-1]),
        "file_bytes": len(blob),
        "zipped_bytes": export.zipped_size(blob),
        "fp32_param_bytes": fp32,
        "compression_ratio": fp32 / len(blob) if fp32 else None,
        "zipped_compression_ratio": fp32 / export.zipped_size(blob) if fp32 else None,
        "sections": info["sections"],
    }


def run_pipeline(cfg: PipelineConfig, run_dir: str, output: str) -> dict:
    run = Run(cfg, run_dir)
    teacher = stage_train(run)
    compressed = stage_compress(run, teacher)
    exported = stage_export(run, compressed, output)
    results = evaluate_file(output, run.test_set)
    results["calibration_val"] = exported["calibration"]
    results["uncompressed_test"] = train.evaluate(teacher, run.loader(run.test_set, False, 256))
    _save_json(run.path("results.json"), results)
    return results


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _state_bytes(model: torch.nn.Module) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def _save_json(path: str, obj) -> None:
    export.atomic_write(path, json.dumps(obj, indent=2, default=float).encode())
