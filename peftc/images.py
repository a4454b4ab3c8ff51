"""Image data for ``image-cls`` and ``semantic-segmentation``: reading, preprocessing, batches, metrics.

Two layouts for ``image-cls``:

- a JSON-lines file, one ``{"image": "cats/1.png", "label": "cat"}`` per line (``label``: a class
  name or an integer id ``0..n-1``, as for ``seq-cls``);
- a folder holding one subfolder of images per class (``data/cat/*.png``, ``data/dog/*.png``): the
  subfolder names, sorted, are the classes.

``semantic-segmentation`` reads JSON lines ``{"image": "img/1.png", "mask": "masks/1.png"}``: the mask
is a single-channel PNG holding a class id per pixel, :data:`~peftc.tasks.IGNORE_INDEX` (255) for
pixels no loss or metric counts. The classes are ``0..max id`` over the training masks.

Relative paths are relative to the JSON-lines file's folder. Reading is strict, as for text data: a
line without its fields, an image that does not exist or cannot be decoded, or a mask whose size
differs from its image is a :class:`~peftc.errors.DataError` naming ``file:line``.

Preprocessing is the model's transformers image processor (:func:`peftc.models.image_processor`):
resize to the model's ``image_size``, rescale to [0, 1], normalise with its mean and std; masks are
resized with nearest-neighbour by the same processor (``SegformerImageProcessor``). Images are
decoded per batch, never all held in memory.

Images need Pillow (``pip install 'peftc[vision]'``); without it, reading says so in one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftc.errors import DataError
from peftc.files import json_lines
from peftc.tasks import IGNORE_INDEX

__all__ = ["IMAGE_SUFFIXES", "ImageData", "ImageEncoded", "encode_images", "mean_iou", "read_images"]

#: Files an image folder's class subfolders may hold (others are ignored).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

_EXAMPLE = {
    "image-cls": '{"image": "images/cat1.png", "label": "cat"}',
    "semantic-segmentation": '{"image": "images/1.png", "mask": "masks/1.png"}',
}


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError as e:
        raise DataError(
            "image tasks read images with Pillow, which is not installed: pip install 'peftc[vision]'"
        ) from e
    return Image


@dataclass
class ImageData:
    """Examples read from a JSON-lines file or an image folder (paths only; images are decoded per batch).

    Attributes:
        path: the file or folder read.
        task: ``image-cls`` or ``semantic-segmentation``.
        images: one image path per example.
        labels: ``image-cls``: the class id of each image.
        masks: ``semantic-segmentation``: the mask path of each image.
        id2label: class id -> name.
        lines: where each example came from (line number; 0 for an image folder), for messages.
        string_labels: whether the labels were names (else integers).
    """

    path: Path
    task: str
    images: list[Path]
    labels: list[int] | None = None
    masks: list[Path] | None = None
    id2label: dict[int, str] | None = None
    lines: list[int] = field(default_factory=list)
    string_labels: bool = False

    def __len__(self) -> int:
        return len(self.images)

    @property
    def label2id(self) -> dict[str, int] | None:
        return {v: k for k, v in self.id2label.items()} if self.id2label else None

    def eval_kwargs(self) -> dict[str, Any]:
        """What :func:`read_images` needs to check evaluation data against these (training) classes."""
        if self.task == "semantic-segmentation" or not self.string_labels:
            return {"num_labels": len(self.id2label or {})}
        return {"label2id": self.label2id}


def read_images(
    path: str | Path, task: str, label2id: dict[str, int] | None = None, num_labels: int | None = None
) -> ImageData:
    """Read and check image data: a JSON-lines file, or (``image-cls``) a folder of class subfolders.

    Args:
        path: the file or folder.
        task: ``image-cls`` or ``semantic-segmentation``.
        label2id: evaluation data of string-labelled training data: the training classes.
        num_labels: evaluation data of integer-labelled (or segmentation) training data: ids must be below it.

    Raises:
        DataError: Pillow missing, an unreadable file, a bad line, a missing or undecodable image, a
            mask of another size than its image or with class ids out of range.
    """
    from peftc.dataset import _label_ids

    Image = _pil()
    path = Path(path).expanduser()
    if task not in _EXAMPLE:
        raise DataError(f"task {task!r} has no image data format; supported: {', '.join(_EXAMPLE)}")
    if path.is_dir():
        if task != "image-cls":
            raise DataError(
                f"data path {path} is a folder; semantic-segmentation reads a JSON-lines file of lines like "
                f"{_EXAMPLE[task]}"
            )
        return _read_folder(path, label2id, num_labels, Image)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(
            f"cannot read data file {path}: {e.strerror or e}; pass a JSON-lines file or an image folder"
        ) from e
    images: list[Path] = []
    masks: list[Path] = []
    raw_labels: list[Any] = []
    lines: list[int] = []
    for lineno, obj in json_lines(path, raw, lambda n, what: _fail(path, n, what, task)):
        image = _image_path(path, lineno, obj, "image", task)
        size = _check_image(path, lineno, image, Image)
        if task == "image-cls":
            if "label" not in obj:
                raise _fail(path, lineno, "missing field 'label'", task)
            label = obj["label"]
            if isinstance(label, bool) or not isinstance(label, (int, str)) or label == "":
                what = f"field 'label' must be an integer or a non-empty string, got {label!r}"
                raise _fail(path, lineno, what, task)
            if raw_labels and type(label) is not type(raw_labels[0]):
                raise DataError(
                    f"{path}:{lineno}: label {label!r} is a {type(label).__name__} but line {lines[0]} has "
                    f"{raw_labels[0]!r}; use integer labels or string labels throughout the file"
                )
            raw_labels.append(label)
        else:
            mask = _image_path(path, lineno, obj, "mask", task)
            mask_size = _check_image(path, lineno, mask, Image)
            if mask_size != size:
                raise DataError(
                    f"{path}:{lineno}: mask {mask} is {mask_size[0]}x{mask_size[1]} but image {image} is "
                    f"{size[0]}x{size[1]}; a mask labels every pixel of its image"
                )
            masks.append(mask)
        images.append(image)
        lines.append(lineno)
    if not images:
        raise DataError(f"data file {path} holds no examples; add JSON lines like {_EXAMPLE[task]}")
    data = ImageData(path=path, task=task, images=images, lines=lines)
    if task == "image-cls":
        data.labels, data.id2label = _label_ids(path, raw_labels, lines, label2id, num_labels)
        data.string_labels = isinstance(raw_labels[0], str)
    else:
        data.masks = masks
        data.id2label = _mask_classes(data, num_labels, Image)
    return data


def _fail(path: Path, lineno: int, what: str, task: str) -> DataError:
    return DataError(f"{path}:{lineno}: {what}; each line must be a JSON object like {_EXAMPLE[task]}")


def _image_path(path: Path, lineno: int, obj: dict, key: str, task: str) -> Path:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        what = f"missing field {key!r}" if key not in obj else f"field {key!r} must be a path, got {value!r}"
        raise _fail(path, lineno, what, task)
    return (path.parent / value).resolve()


def _check_image(path: Path, lineno: int | None, image: Path, Image: Any) -> tuple[int, int]:
    """The image's (width, height), reading only its header; a missing or unreadable file is a DataError."""
    where = f"{path}:{lineno}" if lineno else str(path)
    if not image.is_file():
        raise DataError(f"{where}: image {image} does not exist (paths are relative to the data file's folder)")
    try:
        with Image.open(image) as im:
            return im.size
    except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, ValueError…
        raise DataError(f"{where}: cannot read image {image}: {type(e).__name__}: {e}") from e


def _read_folder(path: Path, label2id: dict[str, int] | None, num_labels: int | None, Image: Any) -> ImageData:
    """``image-cls`` from a folder of class subfolders (names sorted: the class ids)."""
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    images: list[Path] = []
    names: list[str] = []
    for name in classes:
        for image in sorted(p for p in (path / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            _check_image(path / name, None, image, Image)
            images.append(image.resolve())
            names.append(name)
    if not images:
        raise DataError(
            f"image folder {path} holds no images; put each class's images ({', '.join(IMAGE_SUFFIXES)}) in a "
            "subfolder named after the class"
        )
    if num_labels is not None and label2id is None:
        raise DataError(
            f"{path}: an image folder names its classes but the training data has integer labels; use the same kind"
        )
    unknown = sorted(set(names) - set(label2id)) if label2id is not None else []
    if unknown:
        raise DataError(
            f"{path}: class folder {unknown[0]!r} is not a class of the training data "
            f"({', '.join(sorted(label2id or {}))}); rename it or add it to the training data"
        )
    if label2id is None and len(set(names)) < 2:
        raise DataError(f"{path}: every image is in class folder {names[0]!r}; classification needs two classes")
    label2id = label2id if label2id is not None else {name: i for i, name in enumerate(sorted(set(names)))}
    labels = [label2id[name] for name in names]
    id2label = {i: name for name, i in label2id.items()}
    return ImageData(path, "image-cls", images, labels, None, id2label, [0] * len(images), True)


def _mask_classes(data: ImageData, num_labels: int | None, Image: Any) -> dict[int, str]:
    """Segmentation classes: ``0..max id`` of the training masks (255 ignored); eval masks must stay below."""
    top = -1
    for mask, lineno in zip(data.masks or [], data.lines, strict=True):
        with Image.open(mask) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise DataError(
                    f"{data.path}:{lineno}: mask {mask} has mode {im.mode}; a mask is one channel of class ids "
                    "(mode L or P)"
                )
            values = np.unique(np.asarray(im))
        values = values[values != IGNORE_INDEX]
        if values.size:
            if num_labels is not None and int(values.max()) >= num_labels:
                raise DataError(
                    f"{data.path}:{lineno}: mask {mask} holds class {int(values.max())} but the training masks have "
                    f"classes 0..{num_labels - 1}"
                )
            top = max(top, int(values.max()))
    count = num_labels if num_labels is not None else top + 1
    if count < 2:
        raise DataError(
            f"{data.path}: the masks hold {count} class(es); segmentation needs class ids 0..n-1 with n >= 2 "
            f"({IGNORE_INDEX} marks ignored pixels)"
        )
    return {i: f"LABEL_{i}" for i in range(count)}


@dataclass
class ImageEncoded:
    """Image examples ready to batch with a model's image processor (the ``Encoded`` of image tasks)."""

    data: ImageData
    processor: Any
    task: str

    def __len__(self) -> int:
        return len(self.data)

    def collate(self, indices: Sequence[int], input_names: Sequence[str]) -> dict[str, torch.Tensor]:
        """``pixel_values`` of the images at ``indices`` (and ``labels``: class ids, or masks ``[b, h, w]``)."""
        if list(input_names) != ["pixel_values"]:
            raise DataError(f"image data feeds pixel_values, but the program takes {list(input_names)}")
        Image = _pil()
        images = []
        for i in indices:
            with Image.open(self.data.images[i]) as im:
                images.append(im.convert("RGB"))
        if self.task == "semantic-segmentation":
            masks = []
            for i in indices:
                with Image.open(self.data.masks[i]) as im:  # type: ignore[index]
                    masks.append(np.asarray(im).astype(np.int64))
            out = self.processor(images=images, segmentation_maps=masks, return_tensors="pt")
            return {"pixel_values": out["pixel_values"].float(), "labels": out["labels"].long()}
        out = self.processor(images=images, return_tensors="pt")
        labels = torch.tensor([self.data.labels[i] for i in indices], dtype=torch.long)  # type: ignore[index]
        return {"pixel_values": out["pixel_values"].float(), "labels": labels}


def encode_images(data: ImageData, processor: Any) -> ImageEncoded:
    """Image data with the model's image processor (resize, rescale, normalise), for :meth:`ImageEncoded.collate`."""
    return ImageEncoded(data, processor, data.task)


def mean_iou(confusion: np.ndarray) -> dict[str, float]:
    """Mean intersection-over-union and pixel accuracy from a ``[classes, classes]`` confusion matrix.

    Rows are true classes, columns predicted ones (ignored pixels never counted). A class that occurs
    in neither the labels nor the predictions has no IoU and is left out of the mean, as the
    ``evaluate`` library's ``mean_iou`` (nan-mean) does.
    """
    confusion = confusion.astype(np.float64)
    intersection = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    total = confusion.sum()
    return {
        "mean_iou": float((intersection[present] / union[present]).mean()) if present.any() else float("nan"),
        "pixel_accuracy": float(intersection.sum() / total) if total else float("nan"),
    }
