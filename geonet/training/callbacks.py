"""Lightning callbacks of a training run: checkpoints, Ctrl-C, throughput.

* :class:`RunCheckpoint` writes the run's checkpoints atomically at the end of an epoch: Lightning's
  resumable ``last.ckpt`` (also once before the first step, so a run stopped at any point can
  ``--resume``) and geonet's detector checkpoints ``last.pt`` and ``best.pt`` (best validation AP);
  with DDP, rank 0 alone writes. Short epochs are saved at most every :data:`SAVE_EVERY_S` seconds,
  besides every validated epoch and the last.
* :class:`DeferredInterrupt` and :class:`StopOnInterrupt`: Ctrl-C stops at the next batch boundary.
* :class:`Throughput`: images per second and the share of time spent waiting for data.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from geonet.atomic import atomic_file
from geonet.checkpoint import CheckpointHeader, save_checkpoint
from geonet.training.task import pl

__all__ = ["RunCheckpoint", "DeferredInterrupt", "StopOnInterrupt", "Throughput", "SAVE_EVERY_S"]

#: Seconds of training between two saves of the resumable state when epochs are short. Saving ``last.ckpt``
#: and ``last.pt`` (200 MB for MobileNetV2-FPN with AdamW's state) after every epoch of a NEON
#: leave-one-site-out fold (3 steps per epoch) took 8 % of its time (py-spy); Ctrl-C or a crash now loses at
#: most this much training, plus the epoch under way.
SAVE_EVERY_S = 60.0


def save_due(epoch: int, *, max_epochs: int, val_every: int, seconds_since_save: float,
             every_s: float = SAVE_EVERY_S) -> bool:
    """Whether the end of ``epoch`` (0-based) saves the run's checkpoints: an epoch that ran validation (so
    ``best.pt`` follows every validation), the last epoch, or one ending ``every_s`` seconds or more after
    the previous save."""
    return (epoch + 1) % max(1, val_every) == 0 or epoch + 1 >= max_epochs or seconds_since_save >= every_s


class RunCheckpoint(pl.Callback):
    """Atomic end-of-epoch checkpoints: Lightning's ``last.ckpt`` and geonet's ``last.pt`` / ``best.pt``.

    Args:
        run: the run folder.
        header: ``(metrics, epoch) -> CheckpointHeader`` of the detector checkpoints.
        has_val: whether there is a validation split (without one, every epoch is the best).
        resume: the run continues from ``last.ckpt`` (no checkpoint before the first step then).

    Attributes:
        best, best_epoch: best validation AP so far and its epoch (part of ``last.ckpt``).
        saved_epochs: complete epochs whose state ``last.ckpt`` holds (what ``--resume`` continues from).
    """

    def __init__(self, run: str | Path, header: Callable[[dict, int], CheckpointHeader], *, has_val: bool,
                 resume: bool = False):
        self.run = Path(run)
        self.header = header
        self.has_val = has_val
        self.resume = resume
        self.best = -math.inf
        self.best_epoch = -1
        self.saved_epochs = 0
        self._saved_at = time.monotonic()

    @property
    def state_key(self) -> str:
        return "geonet.RunCheckpoint"

    def state_dict(self):
        return {"best": float(self.best), "best_epoch": int(self.best_epoch)}

    def load_state_dict(self, state):
        self.best = float(state["best"])
        self.best_epoch = int(state["best_epoch"])

    def _save_resume(self, trainer):
        # Trainer.save_checkpoint is collective under DDP (every process calls it; rank 0 alone writes)
        if not trainer.is_global_zero:
            trainer.save_checkpoint(self.run / "last.ckpt")
            return
        with atomic_file(self.run / "last.ckpt") as tmp:
            trainer.save_checkpoint(tmp)

    def on_train_start(self, trainer, pl_module):
        self.saved_epochs = trainer.current_epoch  # 0, or where a resumed run starts
        self._saved_at = time.monotonic()
        if not self.resume:
            self._save_resume(trainer)  # a resumable state before the first step

    def on_train_epoch_end(self, trainer, pl_module):
        epoch = trainer.current_epoch
        due = save_due(epoch, max_epochs=trainer.max_epochs, val_every=trainer.check_val_every_n_epoch,
                       seconds_since_save=time.monotonic() - self._saved_at, every_s=SAVE_EVERY_S) or trainer.should_stop
        # every DDP process must take the same decision (the save is collective): rank 0's clock decides
        if not trainer.strategy.broadcast(due, src=0):
            return
        if not trainer.is_global_zero:
            self._save_resume(trainer)
            self._saved(epoch)
            return
        metrics = dict(getattr(pl_module, "last_metrics", {}) or {})
        header = self.header(metrics, epoch)
        save_checkpoint(self.run / "last.pt", pl_module.model, header)
        score = metrics.get("AP")
        score = -1.0 if score is None else float(score)
        if not self.has_val or score > self.best:
            self.best, self.best_epoch = score, epoch
            save_checkpoint(self.run / "best.pt", pl_module.model, header)
        self._save_resume(trainer)
        self._saved(epoch)

    def _saved(self, epoch: int) -> None:
        # after the write: a second Ctrl-C that cuts it short leaves the previous last.ckpt (atomic writes)
        self.saved_epochs, self._saved_at = epoch + 1, time.monotonic()


class DeferredInterrupt:
    """Ctrl-C during training: stop at the next batch boundary, in the main loop.

    Python delivers SIGINT as a ``KeyboardInterrupt`` wherever the main thread happens to be; raised
    inside a finaliser (``__del__``, a weakref callback) it is printed and swallowed, and training
    carries on (seen once in CI). Inside ``with DeferredInterrupt() as stop:`` the handler only sets a
    flag; :meth:`check` (called by :class:`StopOnInterrupt` from the batch and epoch hooks) raises
    ``KeyboardInterrupt`` there, so Lightning's graceful shutdown runs and the last saved epoch's
    checkpoint is kept. A second Ctrl-C interrupts at once.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


class StopOnInterrupt(pl.Callback):
    """Raise the deferred Ctrl-C of a :class:`DeferredInterrupt` at batch and epoch boundaries."""

    def __init__(self, interrupt: DeferredInterrupt):
        self.interrupt = interrupt

    def on_train_batch_end(self, *args, **kwargs):
        self.interrupt.check()

    def on_validation_batch_end(self, *args, **kwargs):
        self.interrupt.check()

    def on_train_epoch_start(self, *args, **kwargs):
        self.interrupt.check()


class Throughput(pl.Callback):
    """Training images per second (also shown as ``img_s`` in the progress bar) and data wait.

    Attributes:
        step_time: seconds inside training steps (forward, backward, optimiser).
        data_wait: seconds between steps of one epoch (waiting for the DataLoader).
        images: training images seen.
    """

    def __init__(self):
        self.step_time = 0.0
        self.data_wait = 0.0
        self.images = 0
        self._t_last: float | None = None
        self._t_start: float | None = None

    def on_train_epoch_start(self, trainer, pl_module):
        self._t_last = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if self._t_last is not None:
            self.data_wait += now - self._t_last
        self._t_start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        n = len(batch[0])
        if self._t_start is not None:
            dt = now - self._t_start
            self.step_time += dt
            self.images += n
            pl_module.log("img_s", n / max(dt, 1e-9), on_step=True, prog_bar=True, logger=False, batch_size=n)
        self._t_last = now

    @property
    def images_per_second(self) -> float:
        return self.images / self.step_time if self.step_time else 0.0

    @property
    def data_wait_fraction(self) -> float:
        return self.data_wait / max(self.data_wait + self.step_time, 1e-9)
