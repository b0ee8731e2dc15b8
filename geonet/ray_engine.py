"""Detection over many scenes on a Ray cluster (``geonet detect --engine ray``).

Each scene is one Ray task on an *actor*: an actor holds one :class:`geonet.detector.Detector` (one model in
memory; one GPU per actor when the cluster has GPUs) and runs :func:`geonet.detect.detect_scene`, the
function the plain command runs, with its own reader threads. So the outputs are the plain command's,
feature for feature, whatever the number of actors (tested).

**Faults.** An actor whose process dies (a killed worker, a lost node) is restarted by Ray and its scene
retried (``max_restarts``/``max_task_retries``, :data:`RETRIES` each). Outputs are written atomically by
the actor (a temporary file renamed when complete), so a retried scene never leaves half a file, and the
temporary files of killed attempts are removed when the scene is tried again. A scene that still fails
is reported and counted in ``DetectReport.failed``; the others go on. ``--resume`` skips the scenes whose
output exists.

**Large scenes.** A scene of more than ``DetectConfig.band_tiles`` tiles is split into *bands*: runs of
consecutive tile batches in row-major order (whole tile rows when the batch size divides the row), each
a task on any actor. A band task returns its tiles' detections (boxes in tile pixels, already limited to
the scene's valid pixels), not a file; the driver joins the bands in order and runs the seam merge and
the writer over them, in a thread of its own while the actors go on. The merge sees exactly the tile
stream of the plain command, so band seams are tile seams: no duplicates, no truncated boxes, the same
features. A band whose actor dies is retried like a scene.

Ray is an optional dependency: ``pip install 'geonet[ray]'``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from geonet.detect import (DetectConfig, DetectReport, SceneResult, _check_config, batch_size, detect_scene, plan_scene,
                           resolve_outputs, scene_config, scenes_to_do, write_scene)
from geonet.detector import Detector
from geonet.errors import GeonetError, InputError, RunError
from geonet.pipeline import ScenePlan, TileDetections, tile_batches, tile_detections

log = logging.getLogger(__name__)

__all__ = ["detect_ray", "SceneWorker", "Band", "split_bands", "RETRIES"]

#: Restarts of a dead actor and retries of its scene.
RETRIES = 3
#: Object store of a Ray instance that geonet starts itself: tasks pass paths and small results only.
OBJECT_STORE_BYTES = 100 * 2**20


@dataclass
class Band:
    """What a band task returns: its batches' :class:`geonet.pipeline.TileDetections` (NumPy, no pixels),
    where the model ran (``device``, ``precision``), or an ``error`` (a :class:`GeonetError`'s message)."""

    parts: list[TileDetections] = field(default_factory=list)
    device: str = "cpu"
    precision: str = "32"
    error: str | None = None


def split_bands(plan: ScenePlan, batch: int, band_tiles: int) -> list[list[list[tuple[int, int]]]]:
    """The tile batches of ``plan`` (:func:`geonet.pipeline.tile_batches`, ``batch`` tiles each) in bands of
    about ``band_tiles`` tiles (whole batches, row-major order); one band when the scene has at most
    ``band_tiles`` tiles or ``band_tiles`` is 0."""
    batches = tile_batches(plan.grid, batch)
    if band_tiles <= 0 or plan.grid.n_tiles <= band_tiles:
        return [batches]
    per = max(1, band_tiles // batch)
    return [batches[k:k + per] for k in range(0, len(batches), per)]


class SceneWorker:
    """A Ray actor: one detector, scenes or bands of scenes one after another.

    Args:
        cfg: :class:`DetectConfig` as a dict.
        n_scenes: scenes in the whole run (several: one preview beside each output).
        threads: torch threads (the actor's CPUs).
        before_scene: called with the scene path and the band index (``None`` for a whole scene) before
            each task, inside the actor (fault-injection tests).
    """

    def __init__(self, cfg: dict, n_scenes: int, threads: int,
                 before_scene: Callable[[str, int | None], None] | None = None):
        import torch

        torch.set_num_threads(max(1, threads))
        self.cfg = DetectConfig(**cfg)
        self.n_scenes = n_scenes
        self.before_scene = before_scene
        c = self.cfg
        self.det = Detector(c.model, device=c.device, precision=c.amp, score_thresh=c.score_thresh, nms_iou=c.nms_iou,
                            tta=c.tta)
        self._plan: tuple[str, ScenePlan] | None = None

    def run(self, scene: str, output: str) -> SceneResult:
        """Detect one scene into ``output`` (atomic); a :class:`GeonetError` becomes the result's ``error``."""
        if self.before_scene is not None:
            self.before_scene(scene, None)
        try:
            return detect_scene(scene, self.det, scene_config(self.cfg, Path(output), self.n_scenes), output)
        except GeonetError as exc:
            return SceneResult(scene=scene, output=output, error=str(exc))

    def run_band(self, scene: str, band: int, batches: list[list[tuple[int, int]]]) -> Band:
        """Detect the tiles of ``batches`` (one band) of ``scene``; a :class:`GeonetError` becomes ``error``."""
        if self.before_scene is not None:
            self.before_scene(scene, band)
        try:
            if self._plan is None or self._plan[0] != scene:
                self._plan = (scene, plan_scene(scene, self.det, self.cfg))
            plan = self._plan[1]
            preview = bool(self.cfg.preview)
            parts = [td.to_host(plan.grid if preview else None)
                     for td in tile_detections(scene, self.det, plan, batches, workers=self.cfg.workers,
                                                      keep_data=preview)]
            return Band(parts=parts, device=self.det.device.type, precision=self.det.precision)
        except GeonetError as exc:
            return Band(error=str(exc))


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
               before_scene: Callable[[str, int | None], None] | None = None) -> DetectReport:
    """Detect objects in many scenes with Ray actors (module docstring); the arguments of
    :func:`geonet.detect.detect`, plus ``before_scene`` (:class:`SceneWorker`, tests).

    ``cfg.address``: the Ray cluster (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``); ``None``: a Ray instance
    already initialised in this process, or a local one started (and stopped) here. ``cfg.actors``:
    detectors working at once (default: the cluster's GPUs, else one per 2 CPUs), each with an equal share
    of the cluster's CPUs. ``cfg.band_tiles``: scenes of more tiles are split into bands.

    Returns:
        :class:`geonet.detect.DetectReport`; scenes in the order they finished.

    Raises:
        InputError: Ray missing, bad options, model or outputs (before any scene runs).
    """
    ray = _import_ray()
    t0 = time.perf_counter()
    _check_config(cfg)
    # on the driver, on the CPU: a bad model fails here in one line (not in every actor); the report's
    # settings; the plans of the scenes; the merge and the writer of scenes split into bands
    driver = Detector(cfg.model, device="cpu", precision="32", score_thresh=cfg.score_thresh, nms_iou=cfg.nms_iou,
                      tta=cfg.tta)
    paths, outs = resolve_outputs(scenes, output, cfg.format, asset=cfg.asset)
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
    writer = ThreadPoolExecutor(1, thread_name_prefix="geonet-ray-write")

    def finished(r: SceneResult) -> None:
        if r.error:
            log.error("%s", r.error)
        results.append(r)
        if on_scene is not None:
            on_scene(r)

    try:
        res = ray.cluster_resources()
        gpus, cpus = int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
        use_gpu = gpus > 0 and cfg.device != "cpu"
        bs = batch_size(cfg, "cuda" if use_gpu else "cpu")
        # the units of work: (scene, None) for a whole scene, (scene, k) for band k of a large one
        units: list[tuple[int, int | None]] = []
        bands: dict[int, list] = {}  # scene -> its bands' batches
        plans: dict[int, ScenePlan] = {}
        for i in todo:
            try:
                plans[i] = plan_scene(paths[i], driver, cfg)
            except GeonetError as exc:
                if len(paths) == 1:  # as the plain command: one scene's input error is the command's
                    raise
                finished(SceneResult(scene=str(paths[i]), output=str(outs[i]), error=str(exc)))
                continue
            split = split_bands(plans[i], bs, cfg.band_tiles)
            if len(split) > 1:
                bands[i] = split
                units += [(i, k) for k in range(len(split))]
                log.info("%s: %d tiles in %d bands", paths[i], plans[i].grid.n_tiles, len(split))
            else:
                units.append((i, None))
        n = cfg.actors or (gpus if use_gpu else max(1, cpus // 2))
        n = max(1, min(n, len(units)))
        threads = max(1, cpus // n)
        # shares, not whole units: more actors than GPUs or CPUs share them instead of waiting forever
        remote = ray.remote(max_restarts=RETRIES, max_task_retries=RETRIES)(SceneWorker).options(
            num_cpus=min(threads, cpus / n), num_gpus=min(1.0, gpus / n) if use_gpu else 0)
        cfg_dict = {**asdict(cfg), "batch_size": bs}
        workers = [remote.remote(cfg_dict, len(paths), threads, before_scene) for _ in range(n)] if units else []
        log.info("ray: %d actor(s) of %d CPU(s)%s for %d scene(s), %d task(s)", n, threads,
                 " and 1 GPU" if use_gpu else "", len(plans), len(units))
        band_out: dict[int, list[Band | None]] = {i: [None] * len(b) for i, b in bands.items()}
        band_t0: dict[int, float] = {}
        failed_scenes: set[int] = set()
        writes: set[Future] = set()  # scenes being merged and written
        queue, running, free = list(units), {}, list(workers)

        def write_bands(i: int) -> SceneResult:
            got = band_out.pop(i)
            parts = (td for b in got for td in b.parts)
            try:
                return write_scene(paths[i], driver, plans[i], scene_config(cfg, outs[i], len(paths)), outs[i], parts,
                                   t_start=band_t0[i], run_on=(got[0].device, got[0].precision))
            except GeonetError as exc:
                return SceneResult(scene=str(paths[i]), output=str(outs[i]), error=str(exc))

        while queue or running or writes:
            while free and queue:
                i, k = queue.pop(0)
                if i in failed_scenes:
                    continue
                a = free.pop()
                if k is None:
                    ref = a.run.remote(str(paths[i]), str(outs[i]))
                else:
                    band_t0.setdefault(i, time.perf_counter())
                    ref = a.run_band.remote(str(paths[i]), k, bands[i][k])
                running[ref] = (i, k, a)
            if running:
                ready, _ = ray.wait(list(running), num_returns=1, timeout=0.2 if writes else None)
            else:
                ready = []
                next(iter(writes)).exception()  # only writes left: wait for one
            for done in ready:
                i, k, a = running.pop(done)
                free.append(a)
                try:
                    r = ray.get(done)
                except ray.exceptions.RayError as exc:  # still failing after RETRIES restarts
                    what = f"{paths[i]}" + (f" (band {k + 1} of {len(bands[i])})" if k is not None else "")
                    r = Band(error=f"{what}: the Ray task failed after {RETRIES} retries ({_first_line(exc)})")
                if k is None:
                    finished(r if isinstance(r, SceneResult) else SceneResult(scene=str(paths[i]), output=str(outs[i]),
                                                                              error=r.error))
                elif i in failed_scenes:
                    continue
                elif r.error:
                    failed_scenes.add(i)
                    band_out.pop(i, None)
                    finished(SceneResult(scene=str(paths[i]), output=str(outs[i]), error=r.error))
                else:
                    band_out[i][k] = r
                    if all(b is not None for b in band_out[i]):
                        writes.add(writer.submit(write_bands, i))
            for f in [f for f in writes if f.done()]:
                writes.remove(f)
                finished(f.result())  # a bug in the merge or writer (not a GeonetError) is raised here
    finally:
        writer.shutdown(wait=True, cancel_futures=True)
        if started:
            ray.shutdown()
    return DetectReport(scenes=results, seconds=time.perf_counter() - t0, failed=sum(bool(r.error) for r in results),
                        skipped_done=done_before, score_thresh=float(driver.model.score_thresh),
                        score_source=driver.score_source, nms_iou=driver.nms_iou)
