"""Control maps for the control and dense tasks: canny, soft edge, depth, pose.

    python -m tasks.panels.annotators photo.jpg /tmp/maps     # writes canny.png, hed.png (and depth.png with --depth DIR)

Each map is named for what it is (the rows' params say which annotator made it):
- canny: OpenCV's Canny edge detector, thresholds from the config (white edges on black);
- hed: the prompt's "hed edge map" slot holds a SOFT-EDGE map: the gradient magnitude of a
  Gaussian-blurred image, normalised and gamma-shaped. It is not the HED network (no weights
  ship here); it gives the same kind of thick, graded edges;
- depth: a `transformers` depth-estimation model (Depth Anything, DPT) loaded from a LOCAL folder,
  drawn near-bright like the release's depth maps; the shapes source gives exact depth instead;
- pose: mediapipe's pose landmarker, an optional extra (`pip install .[pose]`); without it
  pose tasks are dropped from the mix with a warning.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import cv2
import numpy as np

from tasks.panels.compose import Reject

log = logging.getLogger(__name__)

ANNOTATORS = {
    "canny": "opencv-canny",
    "hed": "soft-edge (gaussian-sobel magnitude; not the HED network)",
    "depth": "transformers depth-estimation",
    "pose": "mediapipe-pose",
}


def canny(image: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """uint8 RGB -> uint8 [H, W] edges (255 on edges).

    On the colour image, as ControlNet's annotator does: OpenCV takes the strongest channel's
    gradient, so a green shape on a grey of the same brightness still has its outline."""
    return cv2.Canny(np.ascontiguousarray(image), low, high)


def soft_edge(image: np.ndarray, sigma: float = 1.5, gamma: float = 0.6) -> np.ndarray:
    """uint8 RGB -> uint8 [H, W] soft edges: graded, thicker than canny, near-black where flat."""
    blur = cv2.GaussianBlur(image.astype(np.float32) / 255.0, (0, 0), sigma)
    gx = cv2.Sobel(blur, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(blur, cv2.CV_32F, 0, 1, ksize=3)
    mag = np.sqrt((gx * gx + gy * gy).max(axis=2))  # the strongest channel, like canny above
    # Normalised by a high percentile of the edge pixels, so one strong edge does not wash out the rest.
    ref = float(np.percentile(mag, 99.5))
    if ref < 1e-4:
        return np.zeros(mag.shape, np.uint8)
    return np.round(255 * np.clip(mag / ref, 0, 1) ** gamma).astype(np.uint8)


def depth_to_uint8(depth: np.ndarray, near_is_large: bool) -> np.ndarray:
    """Relative depth -> uint8 with near bright (min-max over the image)."""
    d = depth.astype(np.float64)
    lo, hi = float(d.min()), float(d.max())
    if hi - lo < 1e-12:
        return np.zeros(d.shape, np.uint8)
    n = (d - lo) / (hi - lo)
    return np.round(255 * (n if near_is_large else 1 - n)).astype(np.uint8)


class DepthEstimator:
    """A transformers depth model from a local folder, loaded once per worker (GPU when it has one)."""

    def __init__(self, path: str, device: str = "auto"):
        import torch
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        if not Path(path).is_dir():
            raise FileNotFoundError(
                f"depth model folder {path!r} not found: set panels.depth_model to a local transformers "
                "folder (config.json, weights and preprocessor_config.json), e.g. a Depth Anything download")
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForDepthEstimation.from_pretrained(path, local_files_only=True).to(self.device).eval()
        self.torch = torch
        # Depth Anything and DPT predict relative inverse depth (disparity): larger is nearer.
        self.near_is_large = True

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """uint8 RGB [H, W, 3] -> uint8 [H, W], near bright."""
        h, w = image.shape[:2]
        inputs = self.processor(images=image, return_tensors="pt").to(self.device)
        with self.torch.inference_mode():
            pred = self.model(**inputs).predicted_depth  # [1, h', w']
        pred = self.torch.nn.functional.interpolate(pred[:, None].float(), size=(h, w), mode="bicubic",
                                                    align_corners=False)[0, 0]
        return depth_to_uint8(pred.cpu().numpy(), self.near_is_large)


def pose_available() -> bool:
    return importlib.util.find_spec("mediapipe") is not None


class PoseEstimator:
    """mediapipe's pose model (its weights ship inside the mediapipe 0.10.14 wheel)."""

    def __init__(self):
        import mediapipe as mp  # optional extra: pip install .[pose]

        self.mp = mp
        self.pose = mp.solutions.pose.Pose(static_image_mode=True, model_complexity=1)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        result = self.pose.process(np.ascontiguousarray(image))
        if not result.pose_landmarks:
            raise Reject("no_pose", "no person found for the pose estimation map", stage="annotate")
        canvas = np.zeros_like(image)
        self.mp.solutions.drawing_utils.draw_landmarks(
            canvas, result.pose_landmarks, self.mp.solutions.pose.POSE_CONNECTIONS)
        return canvas


class Annotators:
    """The maps one worker can draw, configured once (models load lazily, on first use)."""

    def __init__(self, canny_low: int = 100, canny_high: int = 200, soft_edge_sigma: float = 1.5,
                 depth_model: str | None = None, depth_device: str = "auto"):
        self.canny_low, self.canny_high = canny_low, canny_high
        self.soft_edge_sigma = soft_edge_sigma
        self.depth_model, self.depth_device = depth_model, depth_device
        self._depth: DepthEstimator | None = None
        self._pose: PoseEstimator | None = None

    def available(self, name: str, exact_depth: bool = False) -> bool:
        if name in ("canny", "hed"):
            return True
        if name == "depth":
            return exact_depth or self.depth_model is not None
        if name == "pose":
            return pose_available()
        return False

    def params(self, name: str) -> dict:
        p = {"annotator": ANNOTATORS[name]}
        if name == "canny":
            p.update(canny_low=self.canny_low, canny_high=self.canny_high)
        elif name == "hed":
            p.update(sigma=self.soft_edge_sigma)
        elif name == "depth":
            p.update(depth_model=self.depth_model)
        return p

    def __call__(self, name: str, image: np.ndarray) -> np.ndarray:
        """The named map of a uint8 RGB image, as uint8 [H, W] or [H, W, 3]."""
        if name == "canny":
            return canny(image, self.canny_low, self.canny_high)
        if name == "hed":
            return soft_edge(image, self.soft_edge_sigma)
        if name == "depth":
            if self.depth_model is None:
                raise Reject("no_depth_model", "no depth model configured (panels.depth_model)", stage="annotate")
            if self._depth is None:
                self._depth = DepthEstimator(self.depth_model, self.depth_device)
            return self._depth(image)
        if name == "pose":
            if self._pose is None:
                self._pose = PoseEstimator()
            return self._pose(image)
        raise ValueError(f"unknown map {name!r}: expected canny, hed, depth or pose")


def main(argv: list[str]) -> None:
    from tasks.panels.compose import decode_image, read_bytes

    src, out = argv[0], Path(argv[1])
    depth = argv[argv.index("--depth") + 1] if "--depth" in argv else None
    out.mkdir(parents=True, exist_ok=True)
    image = decode_image(read_bytes(src), src)
    ann = Annotators(depth_model=depth)
    for name in ["canny", "hed"] + (["depth"] if depth else []):
        cv2.imwrite(str(out / f"{name}.png"), ann(name, image))
        print(out / f"{name}.png")


if __name__ == "__main__":
    main(sys.argv[1:])
