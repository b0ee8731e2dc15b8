"""Detection quality on ground the model has not seen: leave-one-site-out on NEON, plus Kampala and Atlanta.

    .venv/bin/python bench/quality_bench.py                       # the default recipe, every protocol
    .venv/bin/python bench/quality_bench.py --recipes today,default --protocols loso
    .venv/bin/python bench/quality_bench.py --list                # the recipes (rows) and protocols

Every row is a *recipe*: the flags a user passes to ``geonet train`` (``default`` passes none), or a detection
row (``tta``): another recipe's trained runs, detected with extra flags (``geonet evaluate --model ... --tta``).
Every protocol trains with ``geonet train`` and scores with ``geonet evaluate`` exactly as a user would, in
subprocesses, so the figures are those of the command line:

* ``loso`` -- leave-one-site-out on ``../shared/data/neon-trees`` (sites SJER, OSBS, HARV): train on the
  plots of two sites, detect on every plot of the third, evaluate at IoU 0.4 (DeepForest's NEON
  benchmark). Precision, recall and F1 are taken at the checkpoint's own operating point (the score
  threshold ``geonet detect`` uses by default), never at a threshold tuned on the test site. AP50 from
  the whole precision-recall curve (detections down to the model's 0.05).
* ``indomain`` -- all 52 NEON plots with the spatial validation split (``--split val=0.2``, whole plots);
  evaluated on the validation plots only (``--aoi val_area.geojson``).
* ``kampala`` -- train on the z19 and z21 rasters (0.30 and 0.075 m) with a block split, evaluate on z20
  (0.15 m, a GSD the model never saw) inside the held-out blocks only.
* ``atlanta`` -- one 16-bit panchromatic scene, block split, evaluated on the held-out blocks.

Two columns are diagnostics, tuned on the test ground and never a result: ``R, any score`` (recall at IoU
0.4 with every detection down to the model's 0.05: does the model find the objects at all?) and ``F1, oracle
thr`` (the best F1 over score thresholds, and that threshold: what choosing the threshold on the test ground
would give). Both come from ``geonet evaluate`` on the fold's detections.

Output: one Markdown table per protocol on stdout and in ``--out``/``quality.md``, plus every run
folder and report (``--out``, default ``bench/out/quality``). A run folder that already holds
``best.pt`` and a report is reused (``--fresh`` retrains), so an interrupted bench resumes; a report older than its
``best.pt`` is redone. A detection row's ``train s`` and ``epochs`` are those of the runs it reuses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = Path(os.environ.get("GEONET_SHARED", REPO.parent / "shared")) / "data"
NEON = SHARED / "neon-trees"
SITES = ("SJER", "OSBS", "HARV")
WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_v2_imagenet.pth"

#: ``--weights auto`` cannot download here (no internet): every row that would use it passes the same ImageNet
#: MobileNetV2 backbone weights from ../shared/weights instead.
W = f"--weights {WEIGHTS}"

#: Recipes: extra flags of ``geonet train``. ``default`` is what a user gets with no flags (plus ``W`` offline);
#: every other row changes one thing against it (an ablation), except ``today``.
RECIPES: dict[str, str] = {
    "default": W,
    # the recipe the README suggested before issue 10 (geonet 0.1: epochs, light augmentation, 40 epochs)
    "today": f"{W} --fit-anchors --size 400 --amp bf16 --epochs 40 --augment light",
    "light-augment": f"{W} --augment light",
    "no-fit-anchors": f"{W} --no-fit-anchors",
    "steps-500": f"{W} --steps 500",
    "steps-300": f"{W} --steps 300",
    "steps-2000": f"{W} --steps 2000",
    "lr-3e-4": f"{W} --lr 3e-4",
    "lr-1e-3": f"{W} --lr 1e-3",
    "batch-2": f"{W} --batch-size 2",
    "trainable-5": f"{W} --trainable-layers 5",
    "fp32": f"{W} --amp 32",
    # not an ablation: a wider scale jitter, for sites whose crowns are smaller or larger than the training ones
    "scale-0.5-2": f"{W} --scale-range 0.5,2",
    # narrower FPN and subnets (the subnets' 3x3 convs were 85 % of the multiply-adds at 256 channels)
    "fpn-128": f"{W} --fpn-channels 128",
    "fpn-64": f"{W} --fpn-channels 64",
    "fpn-64+dataset-norm": f"{W} --fpn-channels 64 --normalize dataset",
    # the training data's band statistics for every image (the default before --normalize image)
    "dataset-norm": f"{W} --normalize dataset",
    # the backbone from scratch (the ImageNet weights are the ablated change)
    "no-pretrained": "--weights none",
}


#: Rows that change only the detection: (the recipe whose trained runs they reuse, extra flags of ``geonet evaluate
#: --model``). They train nothing of their own, so they cost a detection pass per fold.
DETECT_ROWS: dict[str, tuple[str, str]] = {
    "tta": ("default", "--tta"),
    "light-augment+tta": ("light-augment", "--tta"),
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the tables: its name, the recipe that trains it (its run folders are
    ``OUT/TRAIN_RECIPE/PROTOCOL[_SITE]/run``), that recipe's train flags, and extra detection flags."""

    name: str
    train_recipe: str
    train_flags: str
    detect_flags: str = ""

    @classmethod
    def named(cls, name: str) -> "Row":
        if name in DETECT_ROWS:
            recipe, detect_flags = DETECT_ROWS[name]
            return cls(name, recipe, RECIPES[recipe], detect_flags)
        if name not in RECIPES:
            raise SystemExit(f"unknown recipe {name!r}; see --list")
        return cls(name, name, RECIPES[name])

    @property
    def trains(self) -> bool:
        """Whether this row trains its own runs (a detection row reuses ``train_recipe``'s)."""
        return self.train_recipe == self.name

    def folders(self, out: Path, fold: str) -> tuple[Path, Path]:
        """The training run folder and this row's report folder of one fold (``loso_SJER``, ``indomain``...)."""
        return out / self.train_recipe / fold / "run", out / self.name / fold


def geonet(*args: str, log: Path) -> float:
    """Run one geonet command (this checkout's), appending its output to ``log``; returns seconds."""
    cmd = [sys.executable, "-m", "geonet.cli.main", *args]
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ geonet " + " ".join(shlex.quote(a) for a in args) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"failed (exit {proc.returncode}): geonet {' '.join(args)}; see {log}")
    return time.perf_counter() - t0


def operating_score(ckpt: Path) -> float:
    """The checkpoint's operating point: the score threshold ``geonet detect`` applies by default."""
    from geonet.detect import Detector

    return float(Detector(ckpt, device="cpu", precision="32").model.score_thresh)


def train_and_evaluate(name: str, row: Row, out: Path, fold: str, train_args: list[str], eval_args: list[str],
                       fresh: bool) -> dict:
    """Train (unless done), detect at the model's low threshold, and evaluate at its operating point."""
    run, folder = row.folders(out, fold)
    report = folder / "report"
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "log.txt"
    summary = run / "summary.json"
    t_train = None
    if not row.trains:  # a detection row: never trains (or retrains) another row's runs
        if not summary.exists():
            raise SystemExit(f"{row.name} detects with {row.train_recipe}'s runs, and {run} has none: run "
                             f"--recipes {row.train_recipe} first (or list it before {row.name}).")
    elif fresh or not summary.exists():
        t_train = geonet("train", *train_args, "-o", str(run), "--overwrite", "--no-progress",
                         *shlex.split(row.train_flags), log=log)
    thr = operating_score(run / "best.pt")
    redo = fresh or t_train is not None or not (report / "report.json").exists() \
        or (report / "report.json").stat().st_mtime < (run / "best.pt").stat().st_mtime \
        or "pairs" not in json.loads((report / "report.json").read_text())["operating_point"]  # before pairs
    if redo:
        geonet("evaluate", "--model", str(run / "best.pt"), *eval_args, "--iou", "0.4", "--score-thresh",
               f"{thr:.6f}", *shlex.split(row.detect_flags), "-o", str(report), "--overwrite", log=log)
    rep = json.loads((report / "report.json").read_text())
    s = json.loads(summary.read_text())
    op = rep["operating_point"]
    detections = sorted((folder / "report-detections").glob("*.geojson"))
    # diagnostics on the same detections, tuned on the test ground (never a result): recall with every detection
    # in the files, down to the model's 0.05 (does it find the objects at all?), and the best F1 over thresholds
    # (what a threshold chosen on this ground would give)
    truth_args = _without(eval_args, "--imagery")
    diag = {}
    for key, thr_args in (("any", ["--score-thresh", "0"]), ("oracle", [])):
        diag_dir = folder / f"report-{key}"
        if redo or not (diag_dir / "report.json").exists():
            geonet("evaluate", *map(str, detections), *truth_args, "--iou", "0.4", *thr_args, "-o", str(diag_dir),
                   "--overwrite", log=log)
        diag[key] = json.loads((diag_dir / "report.json").read_text())["operating_point"]
    # boxes stacked on one object (same class, IoU > 0.3) at the threshold, and the truth's own such pairs
    return {"name": name, "stacked": op["pairs"], "truth_pairs": op["truth_pairs"], "P": op["precision"],
            "R": op["recall"], "F1": op["f1"], "AP50": rep["metrics"]["AP50"],
            "AP": rep["metrics"]["AP"], "thr": thr, "n_truth": rep["n_truth"], "train_s": s["seconds"],
            "epochs": s["epochs_run"], "val_AP50": (s.get("best_metrics") or {}).get("AP50"),
            "R_any": diag["any"]["recall"], "F1_oracle": diag["oracle"]["f1"],
            "thr_oracle": diag["oracle"]["score_thresh"]}


def _without(args: list[str], option: str) -> list[str]:
    """``args`` without ``option`` and its value."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == option:
            skip = True
        else:
            out.append(a)
    return out


def _link_tiles(folder: Path, tiles: list[Path]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for t in tiles:
        dst = folder / t.name
        if not dst.exists():
            dst.symlink_to(t.resolve())
    return folder


def loso(row: Row, out: Path, fresh: bool, folds=SITES) -> list[dict]:
    tiles = sorted((NEON / "tiles").glob("*.tif"))
    labels = str(NEON / "labels" / "trees.shp")
    rows = []
    for site in folds:
        train_dir = _link_tiles(out / "data" / f"without_{site}", [t for t in tiles if not t.name.startswith(site)])
        test_dir = _link_tiles(out / "data" / site, [t for t in tiles if t.name.startswith(site)])
        r = train_and_evaluate(f"test {site}", row, out, f"loso_{site}",
                               ["--imagery", str(train_dir), "--labels", labels, "--class-field", "label"],
                               ["--imagery", str(test_dir), "--truth", labels, "--class-field", "label"], fresh)
        rows.append(r)
    return rows


def indomain(row: Row, out: Path, fresh: bool) -> list[dict]:
    labels = str(NEON / "labels" / "trees.shp")
    run = row.folders(out, "indomain")[0]
    return [train_and_evaluate(
        "NEON val plots", row, out, "indomain",
        ["--imagery", str(NEON / "tiles"), "--labels", labels, "--class-field", "label", "--split", "val=0.2"],
        ["--imagery", str(NEON / "tiles"), "--truth", labels, "--class-field", "label",
         "--aoi", str(run / "val_area.geojson")], fresh)]


def kampala(row: Row, out: Path, fresh: bool) -> list[dict]:
    d = SHARED / "kampala-buildings"
    run = row.folders(out, "kampala")[0]
    return [train_and_evaluate(
        "z20 held-out blocks", row, out, "kampala",
        ["--imagery", str(d / "kampala_z19.tif"), "--imagery", str(d / "kampala_z21.tif"),
         "--labels", str(d / "buildings.geojson"), "--split", "val=0.3", "--split-by", "block"],
        ["--imagery", str(d / "kampala_z20.tif"), "--truth", str(d / "buildings.geojson"),
         "--aoi", str(run / "val_area.geojson")], fresh)]


def atlanta(row: Row, out: Path, fresh: bool) -> list[dict]:
    d = SHARED / "spacenet-atlanta"
    run = row.folders(out, "atlanta")[0]
    return [train_and_evaluate(
        "held-out blocks", row, out, "atlanta",
        ["--imagery", str(d / "atlanta_pan.tif"), "--labels", str(d / "buildings.geojson"), "--split", "val=0.3",
         "--split-by", "block"],
        ["--imagery", str(d / "atlanta_pan.tif"), "--truth", str(d / "buildings.geojson"),
         "--aoi", str(run / "val_area.geojson")], fresh)]


PROTOCOLS = {"loso": loso, "indomain": indomain, "kampala": kampala, "atlanta": atlanta}


def table(title: str, results: dict[str, list[dict]]) -> str:
    lines = [f"### {title}", "", "| recipe | ground | P | R | F1 | AP50 | score thr | stacked pairs (truth's) | truth | "
             "train s | epochs | val AP50 | R, any score | F1, oracle thr |", "|---" * 14 + "|"]
    for recipe, rows in results.items():
        for r in rows:
            val = r["val_AP50"] if r["val_AP50"] is not None else float("nan")
            lines.append(f"| {recipe} | {r['name']} | {r['P']:.3f} | {r['R']:.3f} | {r['F1']:.3f} | {r['AP50']:.3f} | "
                         f"{r['thr']:.3f} | {r['stacked']} ({r['truth_pairs']}) | {r['n_truth']} | "
                         f"{r['train_s']:.0f} | {r['epochs']} | {val:.3f} | {r['R_any']:.3f} | "
                         f"{r['F1_oracle']:.3f} ({r['thr_oracle']:.2f}) |")
        if len(rows) > 1:
            mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("P", "R", "F1", "AP50", "train_s", "R_any",
                                                                     "F1_oracle")}
            lines.append(f"| {recipe} | **mean** | **{mean['P']:.3f}** | **{mean['R']:.3f}** | **{mean['F1']:.3f}** | "
                         f"**{mean['AP50']:.3f}** | | {sum(r['stacked'] for r in rows)} "
                         f"({sum(r['truth_pairs'] for r in rows)}) in all | | {mean['train_s']:.0f} | | | {mean['R_any']:.3f} | "
                         f"{mean['F1_oracle']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", default="default", help="comma-separated recipe names (see --list)")
    ap.add_argument("--protocols", default="loso,indomain,kampala,atlanta")
    ap.add_argument("--folds", default=",".join(SITES), help="held-out sites of the loso protocol")
    ap.add_argument("--out", default=str(HERE / "out" / "quality"))
    ap.add_argument("--fresh", action="store_true",
                    help="retrain even where a finished run exists (detection rows: detect again, never retrain)")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    if args.list:
        for k, v in RECIPES.items():
            print(f"{k:>17}: geonet train ... {v}")
        for k, (recipe, v) in DETECT_ROWS.items():
            print(f"{k:>17}: {recipe}'s runs, geonet evaluate --model ... {v}")
        print("protocols:", ", ".join(PROTOCOLS))
        return
    if not NEON.is_dir():
        raise SystemExit(f"needs ../shared/data (not found at {SHARED})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = []
    for proto in args.protocols.split(","):
        results = {}
        rows = [Row.named(n) for n in args.recipes.split(",")]
        # rows that train first: a detection row then detects with this run's (possibly retrained) models
        for row in sorted(rows, key=lambda r: not r.trains):
            if proto == "loso":
                results[row.name] = loso(row, out, args.fresh, folds=args.folds.split(","))
            else:
                results[row.name] = PROTOCOLS[proto](row, out, args.fresh)
            print(table(proto, {row.name: results[row.name]}), flush=True)
        md.append(table(proto, {r.name: results[r.name] for r in rows}))
    text = "\n".join(md)
    print(text)
    (out / "quality.md").write_text(text)


if __name__ == "__main__":
    main()
