"""Training: the second pipeline stage (``geonet train``), built on Lightning.

* :mod:`~geonet.training.config`: :class:`TrainConfig` (nested data, chip, model and optimisation options);
* :mod:`~geonet.training.data`: the datasets of each split behind one :class:`DetectionSource` interface;
* :mod:`~geonet.training.task`: :class:`DetectionTask`, the LightningModule (loss, validation AP, schedule);
* :mod:`~geonet.training.callbacks`: checkpoints, Ctrl-C, throughput;
* :mod:`~geonet.training.run`: :func:`train`: the run folder, the Trainer, the summary and curves.
"""

from geonet.training.config import DataConfig, OptimConfig, TrainConfig, load_run_config, resume_config
from geonet.training.data import DetectionSource, EpochSampler, TrainData, prepare_data, split_listing, val_area
from geonet.training.run import TrainingInterrupted, TrainResult, train
from geonet.training.task import DetectionTask, NonFiniteLoss

__all__ = ["DataConfig", "OptimConfig", "TrainConfig", "load_run_config", "resume_config", "DetectionSource",
           "EpochSampler", "TrainData", "prepare_data", "split_listing", "val_area", "TrainingInterrupted",
           "TrainResult", "train", "DetectionTask", "NonFiniteLoss"]
