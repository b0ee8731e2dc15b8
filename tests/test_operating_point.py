"""The validation operating point: the NMS IoU is never one that stacks boxes the truth does not (issue 10, §2)."""

import numpy as np
import torch

from geonet.boxes import near_duplicate_pairs
from geonet.metrics import coco_annotations
from geonet.training.task import choose_operating_point


def _gt(boxes):
    return {"images": [{"id": 1, "width": 64, "height": 64}],
            "annotations": coco_annotations([1] * len(boxes), np.asarray(boxes, float), [1] * len(boxes)),
            "categories": [{"id": 1, "name": "tree"}]}


def _dets(boxes, scores):
    return [(1, torch.tensor(boxes, dtype=torch.float32), torch.tensor(scores), torch.ones(len(boxes),
                                                                                          dtype=torch.int64))]


def test_near_duplicate_pairs_counts_same_class_pairs_above_the_iou():
    b = [[0, 0, 12, 10], [5, 0, 17, 10], [40, 40, 50, 50], [40, 40, 50, 50]]
    assert near_duplicate_pairs(b) == 2  # IoU 0.41 and 1.0
    assert near_duplicate_pairs(b, [1, 1, 1, 2]) == 1  # the identical pair has two classes
    assert near_duplicate_pairs(b, iou=0.5) == 1
    assert near_duplicate_pairs(np.zeros((0, 4))) == 0


def test_looser_nms_that_stacks_boxes_is_not_chosen():
    # two trees whose truth boxes overlap at IoU 0.18; the model's boxes of them overlap at IoU 0.41. NMS at 0.5
    # keeps both (F1 1.0), at 0.3 and 0.4 one (F1 0.67): 0.5 wins F1 but puts a pair on the map the truth has not.
    gt = _gt([[0, 0, 10, 10], [7, 0, 17, 10]])
    m = choose_operating_point(gt, _dets([[0, 0, 12, 10], [5, 0, 17, 10]], [0.9, 0.8]), 1)
    op = m["operating_point"]
    assert op["nms_iou"] == 0.3 and op["pairs"] == 0 and op["truth_pairs"] == 0
    assert abs(op["f1"] - 2 / 3) < 1e-6


def test_looser_nms_is_chosen_where_the_truth_overlaps_as_much():
    # the truth itself overlaps at IoU 0.43: two boxes at that overlap are two objects, not a stack
    gt = _gt([[0, 0, 10, 10], [4, 0, 14, 10]])
    op = choose_operating_point(gt, _dets([[0, 0, 10, 10], [4, 0, 14, 10]], [0.9, 0.8]), 1)["operating_point"]
    assert op["nms_iou"] == 0.5 and op["pairs"] == 1 == op["truth_pairs"] and op["f1"] == 1.0
