import json

import numpy as np
import torch
from PIL import Image

from geonet.chip import ChipConfig, plan_chips, write_chips
from geonet.datasets import ChipDataset, RasterWindowDataset, band_stats, load_coco, load_voc
from geonet.labels import LabelIndex, read_labels
from geonet.raster import describe_raster
from synth import make_scene


def test_chip_folder_and_on_the_fly_agree(tmp_path):
    r, lab, _ = make_scene(tmp_path, width=300, height=260, n=15)
    infos = [describe_raster(r)]
    index = LabelIndex(read_labels(lab))
    cfg = ChipConfig(size=128, stride=100, negative_ratio=1.0, val_fraction=0.3, split_by="block", block_size=150)
    plan = plan_chips(infos, index, cfg)
    write_chips(plan, tmp_path / "chips", cfg)
    for split in ("train", "val"):
        a = ChipDataset(tmp_path / "chips", split=split)
        b = RasterWindowDataset(plan, split=split)
        assert len(a) == len(b) > 0
        for i in range(len(a)):
            ia, ta = a[i]
            ib, tb = b[i]
            assert torch.equal(ia, ib)
            # COCO stores boxes rounded to 1e-3 px
            assert torch.allclose(ta["boxes"], tb["boxes"], atol=2e-3)
            assert torch.equal(ta["labels"], tb["labels"])
            assert torch.allclose(ta["ignore"], tb["ignore"], atol=2e-3)


def test_sample_format_and_fill(tmp_path):
    r, lab, _ = make_scene(tmp_path, width=100, height=90, n=4, nodata=0, bands=1, dtype="uint16")
    cfg = ChipConfig(size=128)
    ds = RasterWindowDataset.from_rasters([describe_raster(r)], LabelIndex(read_labels(lab)), cfg, fill_values=[123.0])
    img, t = ds[0]
    assert img.dtype == torch.float32 and img.shape == (1, 128, 128)
    assert (img[:, 100:, :] == 123.0).all()  # padding holds the fill value
    assert t["boxes"].shape[1] == 4 and t["labels"].dtype == torch.int64
    mean, std = band_stats(ds)
    assert len(mean) == 1 and 40 * 60 < mean[0] < 40 * 254 and std[0] > 0


def test_seeded_augmentation_is_pure(tmp_path):
    r, lab, _ = make_scene(tmp_path, n=5)
    calls = []

    def aug(image, target, g):
        k = int(torch.randint(0, 1000, (1,), generator=g))
        calls.append(k)
        return image + k, target

    ds = RasterWindowDataset.from_rasters([describe_raster(r)], LabelIndex(read_labels(lab)), ChipConfig(size=128),
                                          transform=aug)
    a = ds[(0, 7)][0]
    b = ds[(0, 7)][0]
    c = ds[(0, 8)][0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_coco_remap_and_crowd(tmp_path):
    img = np.zeros((20, 30, 3), np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    coco = {"images": [{"id": 5, "file_name": "a.png", "width": 30, "height": 20}],
            "categories": [{"id": 7, "name": "car"}, {"id": 3, "name": "pool"}],
            "annotations": [{"id": 1, "image_id": 5, "category_id": 7, "bbox": [1, 2, 3, 4], "iscrowd": 0},
                            {"id": 2, "image_id": 5, "category_id": 3, "bbox": [5, 5, 2, 2], "iscrowd": 1}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    recs, names = load_coco(tmp_path / "c.json")
    assert names == ["pool", "car"]  # ordered by category id, remapped to 1..K
    assert recs[0].labels.tolist() == [2] and recs[0].boxes.tolist() == [[1, 2, 4, 6]]
    assert recs[0].ignore.tolist() == [[5, 5, 7, 7]]
    ds = ChipDataset(recs, classes=names)
    im, t = ds[0]
    assert im.shape == (3, 20, 30)


def test_voc(tmp_path):
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "JPEGImages").mkdir()
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "JPEGImages" / "x.png")
    (tmp_path / "Annotations" / "x.xml").write_text(
        "<annotation><filename>x.png</filename>"
        "<object><name>Tree</name><difficult>0</difficult><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>10</xmax>"
        "<ymax>20</ymax></bndbox></object>"
        "<object><name>Tree</name><difficult>1</difficult><bndbox><xmin>30</xmin><ymin>3</ymin><xmax>40</xmax>"
        "<ymax>9</ymax></bndbox></object></annotation>")
    recs, names = load_voc(tmp_path)
    assert names == ["Tree"]
    assert recs[0].boxes.tolist() == [[0, 1, 10, 20]]  # VOC is 1-based inclusive
    assert recs[0].ignore.tolist() == [[29, 2, 40, 9]]  # difficult -> ignore
