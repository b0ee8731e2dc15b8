"""Detection over many scenes on a Ray cluster (``geonet detect --engine ray``).

Each scene is one Ray task on an *actor*: an actor holds one :class:`geonet.detect.Detector` (one model in
memory; one GPU per actor when the cluster has GPUs) and runs :func:`geonet.detect.detect_scene`, the
function the plain command runs, with its own reader threads. So the outputs are the plain command's,
feature for feature, whatever the number of actors (tested).

**Faults.** An actor whose process dies (a killed worker, a lost node) is restarted by Ray and its scene
retried (``max_restarts``/``max_task_retries``, :data:`RETRIES` each). Outputs are written atomically by
the actor (a temporary file renamed when complete), so a retried scene never leaves half a file, and the
temporary files of killed attempts are removed when the scene is tried again. A scene that still fails
is reported and counted in ``DetectReport.failed``; the others go on. ``--resume`` skips the scenes whose
output exists.

Ray is an optional dependency: ``pip install 'geonet[ray]'``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from geonet.detect import (DetectConfig, DetectReport, Detector, SceneResult, _check_config, detect_scene,
                           resolve_outputs, scene_config, scenes_to_do)
from geonet.errors import GeonetError, InputError, RunError

log = logging.getLogger(__name__)

__all__ = ["detect_ray", "RETRIES"]

#: Restarts of a dead actor and retries of its scene.
RETRIES = 3
#: Object store of a Ray instance that geonet starts itself: tasks pass paths and small results only.
OBJECT_STORE_BYTES = 100 * 2**20


class SceneWorker:
    """A Ray actor: one detector, scenes one after another.

    Args:
        cfg: :class:`DetectConfig` as a dict.
        n_scenes: scenes in the whole run (several: one preview beside each output).
        threads: torch threads (the actor's CPUs).
        before_scene: called with the scene path before each scene, inside the actor (fault-injection tests).
    """

    def __init__(self, cfg: dict, n_scenes: int, threads: int, before_scene: Callable[[str], None] | None = None):
        import torch

        torch.set_num_threads(max(1, threads))
        self.cfg = DetectConfig(**cfg)
        self.n_scenes = n_scenes
        self.before_scene = before_scene
        c = self.cfg
        self.det = Detector(c.model, device=c.device, precision=c.amp, score_thresh=c.score_thresh, nms_iou=c.nms_iou,
                            tta=c.tta)

    def run(self, scene: str, output: str) -> SceneResult:
        """Detect one scene into ``output`` (atomic); a :class:`GeonetError` becomes the result's ``error``."""
        if self.before_scene is not None:
            self.before_scene(scene)
        try:
            return detect_scene(scene, self.det, scene_config(self.cfg, Path(output), self.n_scenes), output)
        except GeonetError as exc:
            return SceneResult(scene=scene, output=output, error=str(exc))


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (Ray's errors carry whole remote tracebacks)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def _import_ray():
    try:
        import ray
    except ImportError:
        raise InputError("--engine ray needs Ray, which is not installed.",
                         fix="pip install 'geonet[ray]' (or pip install ray), or leave --engine out.") from None
    return ray


def detect_ray(scenes: Sequence[str], output: str | os.PathLike[str], cfg: DetectConfig, *, on_scene=None,
               before_scene: Callable[[str], None] | None = None) -> DetectReport:
    """Detect objects in many scenes with Ray actors (module docstring); the arguments of
    :func:`geonet.detect.detect`, plus ``before_scene`` (:class:`SceneWorker`, tests).

    ``cfg.address``: the Ray cluster (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``); ``None``: a Ray instance
    already initialised in this process, or a local one started (and stopped) here. ``cfg.actors``:
    detectors working at once (default: the cluster's GPUs, else one per 2 CPUs), each with an equal share
    of the cluster's CPUs.

    Returns:
        :class:`geonet.detect.DetectReport`; scenes in the order they finished.

    Raises:
        InputError: Ray missing, bad options, model or outputs (before any scene runs).
    """
    ray = _import_ray()
    t0 = time.perf_counter()
    _check_config(cfg)
    # on the driver, on the CPU: a bad model fails here in one line (not in every actor); the report's settings
    settings = Detector(cfg.model, device="cpu", precision="32", score_thresh=cfg.score_thresh, nms_iou=cfg.nms_iou)
    paths, outs = resolve_outputs(scenes, output, cfg.format)
    todo, done_before = scenes_to_do(outs, cfg)
    started = False
    if not ray.is_initialized():
        local = cfg.address is None
        try:
            ray.init(address=cfg.address, include_dashboard=False, configure_logging=False,
                     object_store_memory=OBJECT_STORE_BYTES if local else None)
        except Exception as exc:  # ConnectionError, a bad address, a cluster of another Ray version...
            where = f"the Ray cluster at {cfg.address}" if cfg.address else "a local Ray instance"
            raise RunError(f"--engine ray: cannot start or reach {where} ({_first_line(exc)}).",
                           fix="check --address (auto, HOST:PORT) and that `ray status` works there.") from None
        started = True
    results: list[SceneResult] = []
    failed = 0
    try:
        res = ray.cluster_resources()
        gpus, cpus = int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
        use_gpu = gpus > 0 and cfg.device != "cpu"
        n = cfg.actors or (gpus if use_gpu else max(1, cpus // 2))
        n = max(1, min(n, len(todo)))
        threads = max(1, cpus // n)
        # shares, not whole units: more actors than GPUs or CPUs share them instead of waiting forever
        remote = ray.remote(max_restarts=RETRIES, max_task_retries=RETRIES)(SceneWorker).options(
            num_cpus=min(threads, cpus / n), num_gpus=min(1.0, gpus / n) if use_gpu else 0)
        cfg_dict = asdict(cfg)
        workers = [remote.remote(cfg_dict, len(paths), threads, before_scene) for _ in range(n)] if todo else []
        log.info("ray: %d actor(s) of %d CPU(s)%s for %d scene(s)", n, threads, " and 1 GPU" if use_gpu else "",
                 len(todo))
        queue, running, free = list(todo), {}, list(workers)
        while queue or running:
            while free and queue:
                i = queue.pop(0)
                a = free.pop()
                running[a.run.remote(str(paths[i]), str(outs[i]))] = (i, a)
            (done,), _ = ray.wait(list(running), num_returns=1)
            i, a = running.pop(done)
            try:
                r = ray.get(done)
            except ray.exceptions.RayError as exc:  # still failing after RETRIES restarts
                r = SceneResult(scene=str(paths[i]), output=str(outs[i]),
                                error=f"{paths[i]}: the Ray task failed after {RETRIES} retries ({_first_line(exc)})")
            free.append(a)
            if r.error:
                log.error("%s", r.error)
                failed += 1
            results.append(r)
            if on_scene is not None:
                on_scene(r)
    finally:
        if started:
            ray.shutdown()
    return DetectReport(scenes=results, seconds=time.perf_counter() - t0, failed=failed, skipped_done=done_before,
                        score_thresh=float(settings.model.score_thresh), score_source=settings.score_source,
                        nms_iou=settings.nms_iou)
