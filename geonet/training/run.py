"""A training run: the run folder, Lightning's Trainer, the summary and the curves (``geonet train``).

Run folder (``-o runs/NAME``):

* ``config.yaml``: the resolved options (:meth:`TrainConfig.to_dict`); ``model_config.json``: the
  model's configuration; ``split.json``: where the samples of the train and val splits come from;
  ``val_area.geojson``: the ground of the val split (EPSG:4326), the ``--aoi`` for evaluating on
  held-out ground only;
* ``last.ckpt``: Lightning's resumable checkpoint (model, optimizer, schedule, loop state), written
  atomically once before the first step and at the end of every validated epoch, of the last epoch and
  of any epoch ending :data:`~geonet.training.callbacks.SAVE_EVERY_S` seconds after the previous save,
  so a run stopped at any point (Ctrl-C included) can continue with ``--resume``;
* ``last.pt`` and ``best.pt`` (best validation AP): self-describing detector checkpoints
  (:mod:`geonet.checkpoint`) that ``geonet detect`` needs and nothing else;
* ``metrics.csv`` (CSV log), ``tb/`` (TensorBoard), ``curves.png`` (loss and validation AP),
  ``summary.json``.

**Reproducibility.** With ``--seed`` the model initialisation, the shuffling and every augmentation
are fixed (:mod:`geonet.training.data`); on the CPU ``torch.use_deterministic_algorithms`` is on.
Checkpoints are taken at epoch ends only, so a resumed run replays exactly the epochs an
uninterrupted run would: on the CPU it ends with identical weights (tested). Ctrl-C loses at most the
epoch in progress plus the epochs since the last save (at most about a minute of training).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from geonet.atomic import atomic_file, make_parent
from geonet.augment import OverheadAugment
from geonet.checkpoint import CheckpointHeader, read_checkpoint
from geonet.datasets import band_stats, collate
from geonet.device import lightning_precision, resolve_device, resolve_precision
from geonet.errors import InputError, RunError
from geonet.model import ModelConfig
from geonet.torchgeo_weights import is_torchgeo, resolve_torchgeo
from geonet.training.callbacks import DeferredInterrupt, RunCheckpoint, StopOnInterrupt, Throughput
from geonet.training.config import TrainConfig
from geonet.training.data import EpochSampler, TrainData, prepare_data, split_listing, val_area
from geonet.training.task import DetectionTask, pl

log = logging.getLogger(__name__)

__all__ = ["train", "TrainResult", "TrainingInterrupted", "check_run_dir", "model_config_for", "plot_curves"]


class TrainingInterrupted(RunError):
    """Training stopped by Ctrl-C (SIGINT); the last saved epoch's checkpoint is kept."""

    exit_code = 130


@dataclass
class TrainResult:
    """What :func:`train` returns (also written as the run's ``summary.json``). Times are seconds."""

    run_dir: str
    epochs_run: int
    best_epoch: int
    best_metrics: dict
    last_metrics: dict
    seconds: float
    images_per_second: float
    data_wait_fraction: float
    n_train: int
    n_val: int
    n_train_boxes: int
    n_degenerate: int
    device: str
    precision: str
    processes: int = 1
    rank: int = 0


def check_run_dir(cfg: TrainConfig, *, resume: bool, overwrite: bool) -> Path:
    """The run folder, checked (and emptied with ``overwrite``) before anything is read.

    Raises:
        InputError: ``--resume`` without a ``last.ckpt``, or a non-empty folder without ``overwrite``.
    """
    run = Path(cfg.output)
    if resume:
        ckpt = run / "last.ckpt"
        if not ckpt.exists():
            raise InputError(f"--resume: {run} holds no last.ckpt to resume from.",
                             fix="pass the run folder of an earlier `geonet train -o`.")
        try:  # weights_only: a file from elsewhere cannot run code
            state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise InputError(f"--resume: is not a training checkpoint that loads with weights_only=True "
                             f"({type(exc).__name__}).", path=ckpt,
                             fix="resume a run folder that `geonet train` wrote, or start a new run.") from None
        if not isinstance(state, dict) or "state_dict" not in state or "epoch" not in state:
            raise InputError("--resume: is not a Lightning training checkpoint.", path=ckpt,
                             fix="resume a run folder that `geonet train` wrote, or start a new run.")
        return run
    if run.exists() and any(run.iterdir()):
        if not overwrite:
            raise InputError(f"-o {run} exists and is not empty.",
                             fix="choose a new run folder, --resume it, or pass --overwrite.")
        shutil.rmtree(run)
    make_parent(run)
    return run


def model_config_for(cfg: TrainConfig, data: TrainData, mean: Sequence[float], std: Sequence[float]) -> ModelConfig:
    """The model configuration of a new run: the configured model with what the data decide (classes,
    bands, normalisation) and, with ``fit_anchors``, anchors fitted to the training boxes (and to their
    transposes when the augmentation rotates by 90 degrees)."""
    if is_torchgeo(cfg.weights):  # the weights' bands and normalisation (geonet.torchgeo_weights)
        tg = resolve_torchgeo(cfg.weights)
        tg.check_bands(data.in_channels, data.bands)
        if tg.mean is not None:
            log.info("normalisation of %s: mean %s, std %s (not the data's band statistics)", cfg.weights,
                     tg.mean[:3], tg.std[:3])
            mean, std = tg.mean, tg.std
    mc = ModelConfig.from_dict({**cfg.model.to_dict(), "num_classes": len(data.classes),
                                "in_channels": data.in_channels, "mean": list(mean), "std": list(std)})
    if cfg.fit_anchors:
        from geonet.anchors import fit_anchors

        boxes = data.train_boxes
        if cfg.augment != "none":  # 90-degree rotations show every box transposed as well
            boxes = np.concatenate([boxes, boxes[:, [1, 0, 3, 2]]])
        fit = fit_anchors(boxes, (data.chip_size, data.chip_size), base=mc)
        log.info("anchors fitted: coverage %.3f -> %.3f (%s)", fit.default_coverage, fit.coverage, fit.as_flags())
        mc.anchor_sizes, mc.anchor_ratios = tuple(fit.sizes), tuple(fit.ratios)
    return mc


def _write_run_files(run: Path, cfg: TrainConfig, data: TrainData, model_cfg: ModelConfig) -> None:
    """``config.yaml``, ``split.json``, ``model_config.json`` and ``val_area.geojson`` of a new run."""
    with atomic_file(run / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    with atomic_file(run / "split.json") as tmp:
        tmp.write_text(json.dumps(split_listing(data), indent=1))
    with atomic_file(run / "model_config.json") as tmp:
        tmp.write_text(json.dumps(model_cfg.to_dict(), indent=2))
    area = val_area(data)
    if area is not None:
        import geopandas as gpd

        with atomic_file(run / "val_area.geojson") as tmp:
            gpd.GeoDataFrame({"split": ["val"]}, geometry=[area], crs="EPSG:4326").to_file(tmp, driver="GeoJSON")


def _model_config(cfg: TrainConfig, data: TrainData, run: Path, resume: bool) -> ModelConfig:
    """The saved model configuration of a resumed run, or a new one from the data."""
    if resume and (run / "model_config.json").exists():
        model_cfg = ModelConfig.from_dict(json.loads((run / "model_config.json").read_text()))
        if model_cfg.in_channels != data.in_channels:
            raise InputError(f"the run was trained on {model_cfg.in_channels} band(s); the data now give "
                             f"{data.in_channels}.", fix="use the same imagery and --bands as the run.")
        return model_cfg
    mean, std = band_stats(data.train, seed=cfg.seed)
    return model_config_for(cfg, data, mean, std)


#: Validations per run (at most): enough to pick the best epoch, few enough not to dominate short epochs.
VALIDATIONS = 20


def _schedule(cfg: TrainConfig, steps_per_epoch: int) -> tuple[int, int]:
    """``(epochs, validate every n epochs)``: the epochs that make the step budget (or ``--epochs``), rounded
    up to a whole number of validation intervals so that the last epoch is validated."""
    epochs = cfg.optim.epochs_for(steps_per_epoch)
    every = max(1, epochs // VALIDATIONS)
    return math.ceil(epochs / every) * every, every


def _loaders(cfg: TrainConfig, data: TrainData, *, cuda: bool):
    """Training and validation DataLoaders and the optimiser steps per epoch of each process.

    With DDP, :class:`EpochSampler` gives each process its share once the process group is up; the steps
    per epoch (and so the learning-rate schedule) are counted on that share, so a run over N processes
    makes as many optimiser steps as one process with an N times larger batch.
    """
    workers = cfg.workers if cfg.workers is not None else (min(8, os.cpu_count() or 1) if cuda else 0)
    share = EpochSampler.shard_length(len(data.train), cfg.processes)
    drop_last = share > cfg.optim.batch_size

    def loader(ds, shuffle):
        return torch.utils.data.DataLoader(
            ds, batch_size=cfg.optim.batch_size, sampler=EpochSampler(len(ds), cfg.seed, shuffle=shuffle),
            collate_fn=collate, num_workers=workers, pin_memory=cuda, persistent_workers=workers > 0,
            drop_last=shuffle and drop_last)

    steps = share // cfg.optim.batch_size if drop_last else math.ceil(share / cfg.optim.batch_size)
    if cfg.limit_train_batches is not None:
        steps = min(steps, cfg.limit_train_batches)
    return loader(data.train, True), (loader(data.val, False) if data.val is not None else None), steps


def launch_rank(cfg: TrainConfig) -> int:
    """This process's global DDP rank as its launcher set it, before the process group exists.

    0 for a single process and for the process that ``geonet train`` starts (Lightning's launcher
    starts the others with ``LOCAL_RANK``/``NODE_RANK``); ``RANK`` under ``torchrun``; ``SLURM_PROCID``
    under ``srun``. Only rank 0 checks, empties and writes the run folder.
    """
    if cfg.processes == 1:
        return 0
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"])
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"])
    return int(env.get("NODE_RANK", 0)) * cfg.devices + int(env.get("LOCAL_RANK", 0))


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False,
          extra_callbacks: Sequence = (), progress: bool = True) -> TrainResult:
    """Train a detector and write the run folder (module docstring).

    Args:
        cfg: options. With ``resume``, the run's saved configuration
            (:func:`geonet.training.config.resume_config`).
        resume: continue ``cfg.output`` from its ``last.ckpt`` (same schedule and epoch count).
        overwrite: replace an existing, non-empty run folder.
        extra_callbacks: more Lightning callbacks (tests use one to simulate Ctrl-C).
        progress: show Lightning's progress bar (loss, images/s).

    Raises:
        InputError: bad options or data (before anything is written).
        NonFiniteLoss: the loss became NaN/inf; the last good checkpoint is kept.
        TrainingInterrupted: Ctrl-C; the last saved epoch's checkpoint is kept.
    """
    cfg.validate()
    if is_torchgeo(cfg.weights) and not resume:  # a bad name or backbone fails before anything is read
        resolve_torchgeo(cfg.weights).check_backbone(cfg.model.backbone)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.amp, device)
    rank = launch_rank(cfg)
    run = check_run_dir(cfg, resume=resume, overwrite=overwrite) if rank == 0 else Path(cfg.output)
    t0 = time.perf_counter()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    data = prepare_data(cfg)
    model_cfg = _model_config(cfg, data, run, resume)
    for ds in (data.train, data.val):
        if ds is not None:
            ds.fill_values = np.asarray(model_cfg.mean, dtype=np.float32)
    if cfg.augment != "none":
        data.train.transform = OverheadAugment.for_training(strength=cfg.augment, band_std=model_cfg.std,
                                                            scale=cfg.scale_range)
    cuda = device.type == "cuda"
    train_loader, val_loader, steps_per_epoch = _loaders(cfg, data, cuda=cuda)
    epochs, val_every = _schedule(cfg, steps_per_epoch)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    task = DetectionTask(model_cfg.to_dict(), weights="none" if resume else cfg.weights,
                         optim={**asdict(cfg.optim), "epochs": epochs}, steps_per_epoch=steps_per_epoch,
                         classes=data.classes, val_gt=data.val_gt, channels_last=True)  # NHWC: faster convs on CUDA and CPU
    model_cfg = task.model_config  # with what build_model resolved (trainable layers, frozen BN)
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        if not resume:
            _write_run_files(run, cfg, data, model_cfg)
    if cuda:
        torch.backends.cudnn.benchmark = True

    def header(metrics: dict, epoch: int) -> CheckpointHeader:
        return CheckpointHeader(model_config=model_cfg, classes=data.classes, bands=data.bands, dtype=data.dtype,
                                nodata=data.nodata, gsd=data.gsd, chip_size=data.chip_size, box_stats=data.box_stats,
                                box_stats_m=data.box_stats_m, train_config=cfg.to_dict(), metrics=metrics,
                                epoch=epoch)

    checkpoints = RunCheckpoint(run, header, has_val=data.val is not None, resume=resume)
    throughput = Throughput()
    interrupt = DeferredInterrupt()
    callbacks = [checkpoints, throughput, StopOnInterrupt(interrupt),
                 pl.callbacks.LearningRateMonitor(logging_interval="step")]
    if cfg.optim.early_stopping > 0 and data.val is not None:
        callbacks.append(pl.callbacks.EarlyStopping(monitor="val/AP", mode="max", patience=cfg.optim.early_stopping))
    trainer = pl.Trainer(
        max_epochs=epochs, check_val_every_n_epoch=val_every, accelerator="gpu" if cuda else "cpu",
        devices=cfg.devices, num_nodes=cfg.num_nodes, strategy="ddp" if cfg.processes > 1 else "auto",
        precision=lightning_precision(precision), logger=_loggers(run, resume and rank == 0),
        callbacks=callbacks + list(extra_callbacks), deterministic=not cuda, benchmark=cuda,
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(10, steps_per_epoch)), gradient_clip_val=cfg.optim.grad_clip or None,
        enable_progress_bar=progress, limit_train_batches=cfg.limit_train_batches,
        limit_val_batches=1.0 if val_loader is not None else 0, default_root_dir=str(run),
        use_distributed_sampler=False)  # EpochSampler splits the data (validation drops its padded repeats)
    with warnings.catch_warnings():
        for msg in (".*does not have many workers.*", ".*The number of training batches.*",
                    ".*exists and is not empty.*", ".*LeafSpec.*",
                    ".*sync_dist=True.*"):  # validation metrics are computed from every process's detections
            warnings.filterwarnings("ignore", message=msg)
        try:
            with interrupt:
                trainer.fit(task, train_dataloaders=train_loader, val_dataloaders=val_loader,
                            ckpt_path=str(run / "last.ckpt") if resume else None, weights_only=True)
        except SystemExit:  # Lightning's handling of KeyboardInterrupt ends with sys.exit(1)
            if trainer.global_rank != 0:  # another DDP process: rank 0 reports the interruption
                raise SystemExit(TrainingInterrupted.exit_code) from None
            done = checkpoints.saved_epochs
            raise TrainingInterrupted(
                f"training interrupted during epoch {trainer.current_epoch}; {run / 'last.ckpt'} holds the state "
                f"after {done} complete epoch(s).", fix=f"continue with `geonet train --resume -o {run}`.") from None
    best_metrics = read_checkpoint(run / "best.pt")[0].metrics if (run / "best.pt").exists() else {}
    result = TrainResult(
        run_dir=str(run), epochs_run=trainer.current_epoch, best_epoch=checkpoints.best_epoch,
        best_metrics=best_metrics, last_metrics=task.last_metrics, seconds=time.perf_counter() - t0,
        images_per_second=throughput.images_per_second, data_wait_fraction=throughput.data_wait_fraction,
        n_train=len(data.train), n_val=len(data.val) if data.val is not None else 0,
        n_train_boxes=data.n_train_boxes, n_degenerate=data.n_degenerate, device=device.type, precision=precision,
        processes=cfg.processes, rank=trainer.global_rank)
    if trainer.global_rank != 0:
        return result
    plot_curves(run)
    with atomic_file(run / "summary.json") as tmp:
        tmp.write_text(json.dumps(asdict(result), indent=2, default=float))
    return result


def _loggers(run: Path, keep_history: bool) -> list:
    """CSV (``metrics.csv``) and, when installed, TensorBoard (``tb/``) loggers."""
    import logging as _logging

    loggers = [pl.loggers.CSVLogger(save_dir=str(run), name="", version="")]
    if keep_history:
        _keep_csv_history(loggers[0], run)
    try:
        loggers.append(pl.loggers.TensorBoardLogger(save_dir=str(run), name="tb", version="",
                                                    default_hp_metric=False))
    except ModuleNotFoundError:  # tensorboard missing: CSV only
        log.warning("tensorboard is not installed: CSV log only")
    _logging.getLogger("lightning.pytorch").setLevel(_logging.WARNING)
    _logging.getLogger("lightning.fabric").setLevel(_logging.WARNING)
    return loggers


def _keep_csv_history(logger, run: Path) -> None:
    """Carry the epochs ``last.ckpt`` holds over into the resumed run's ``metrics.csv``.

    Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts; on ``--resume`` that
    would lose the history of the epochs before the interruption. The rows of the epochs the checkpoint
    completed (every epoch up to its ``epoch`` unless it was saved before the first step) are written
    back, and the writer appends after them.
    """
    import csv

    path = run / "metrics.csv"
    if not path.exists():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = list(reader.fieldnames or []), list(reader)
    ck = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True, mmap=True)
    done = int(ck["epoch"]) if int(ck.get("global_step", 0)) > 0 else -1
    rows = [r for r in rows if r.get("epoch") not in (None, "") and float(r["epoch"]) <= done]
    exp = logger.experiment  # creating it deletes metrics.csv
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    exp.metrics_keys = sorted(header)


def plot_curves(run: Path) -> Path | None:
    """``curves.png``: training loss per epoch and validation AP / AP50, from ``metrics.csv``."""
    csv = run / "metrics.csv"
    if not csv.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.read_csv(csv)
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    if "train/loss_epoch" in df:
        d = df.dropna(subset=["train/loss_epoch"])
        ax[0].plot(d["epoch"], d["train/loss_epoch"], marker="o", label="loss")
        for k in ("train/cls", "train/box"):
            if k in df:
                dd = df.dropna(subset=[k])
                ax[0].plot(dd["epoch"], dd[k], linestyle="--", label=k.split("/")[1])
        ax[0].set_xlabel("epoch")
        ax[0].set_title("training loss")
        ax[0].legend()
    for k in ("val/AP", "val/AP50"):
        if k in df:
            d = df.dropna(subset=[k])
            ax[1].plot(d["epoch"], d[k], marker="o", label=k.split("/")[1])
    ax[1].set_xlabel("epoch")
    ax[1].set_title("validation")
    ax[1].set_ylim(0, 1)
    if ax[1].lines:
        ax[1].legend()
    else:
        ax[1].text(0.5, 0.5, "no validation split", ha="center", va="center", transform=ax[1].transAxes)
    fig.tight_layout()
    out = run / "curves.png"
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out
