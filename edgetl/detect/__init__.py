"""Object detection (``task = "detection"``): the host side.

The task seam: each task owns, in one place per side, what differs between tasks. For detection:

| concern | host (``edgetl/detect/``) | device (``runtime/``, torch-free) |
| --- | --- | --- |
| dataset readers, validation, tiling, split | ``data.py`` (COCO JSON, YOLO txt, Pascal VOC XML) | |
| model (SSDLite head on a registered backbone), loss, anchors | ``model.py`` | |
| fine-tuning loop, evaluation during training | ``train.py`` | |
| metrics (mAP through pycocotools) | ``metrics.py`` | |
| the gate: float vs quantized (mAP drop + CI, detection agreement) | ``gate.py`` | |
| raw outputs -> boxes (decode, score threshold, NMS), overlay, JSON | | ``runtime/detect.py`` |
| tracking and line counting | | ``runtime/track.py`` |
| composed conveyor scenes (real ELPV cells) | ``scenes.py`` | |

Conventions every module keeps (see ``docs/ARCHITECTURE.md``, "Detection"):

- A box is ``(x1, y1, x2, y2)`` float32 in pixels, continuous coordinates (a box over pixel columns
  0..9 is ``x1=0, x2=10``), ``x1 < x2``, ``y1 < y2``. Arrays: boxes ``(N, 4)`` float32, classes
  ``(N,)`` int64 (0-based index into the class names; no background class), scores ``(N,)`` float32.
- The model's raw outputs (the exported graph ends here, before decoding and NMS), batch first:
  ``boxes`` ``(B, A, 4)`` box regressions against the anchors (torchvision ``BoxCoder`` encoding,
  weights ``(10, 10, 5, 5)``) and ``scores`` ``(B, A, C + 1)`` class logits, column 0 = background,
  column ``k + 1`` = class ``k``. Scores are softmaxed in post-processing.
- Anchors ``(A, 4)`` xyxy in the pixels of the model input (``preprocess.input_size`` = (H, W)),
  in the head's output order, stored as ``anchors.npy`` in runs and artifacts.
- ``manifest.postprocess`` = ``{"kind": "ssd", "anchors": "anchors.npy", "box_coder_weights":
  [10, 10, 5, 5], "score_threshold": 0.3, "nms_iou": 0.5, "max_detections": 100,
  "candidates_per_class": 200, "object_threshold": 0.45}``; the manifest's schema is 2.1 for detection
  (1.x runtimes refuse it; 2.0, without ``object_threshold``, is still read). ``object_threshold`` is
  the score threshold of the objects (``runtime.detect.postprocess_objects``: P(object), every class
  together) that tracking and counting use, chosen by the training on the validation split.
- Coordinates in the checkset and the gate are the model input's; the runtime maps boxes back to the
  frame through the inverse of the preprocessing geometry.
"""
