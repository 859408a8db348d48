"""Tests of ppl_vae.data: finding and checking IDX files, splits, binarisation, batching."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import ppl_vae.data as data
from ppl_vae.data import files as data_files
from ppl_vae.errors import DataError, DatasetNotFoundError

N_TRAIN = 30
N_TEST = 12
REAL_DEFAULT_SEARCH_DIRS = data.default_search_dirs
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


# --------------------------------------------------------------------------------------------
# A tiny MNIST-style dataset written as IDX files
# --------------------------------------------------------------------------------------------


def idx_images(images: np.ndarray) -> bytes:
    n, h, w = images.shape
    return struct.pack(">IIII", 0x00000803, n, h, w) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 0x00000801, len(labels)) + labels.astype(np.uint8).tobytes()


def make_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Random 28x28 images whose first pixel is the image's index, so rows can be traced."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n)
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = rng.integers(0, 10, size=n, dtype=np.uint8)
    return arrays


def write_dataset(folder: Path, *, gz: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = make_arrays(seed)
    for role, stem in FILES.items():
        payload = idx_images(arrays[role]) if role.endswith("images") else idx_labels(arrays[role])
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(payload))
        else:
            (folder / stem).write_bytes(payload)
    return arrays


@pytest.fixture(autouse=True)
def no_system_dirs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the Debian folder, the user cache and $PPL_VAE_DATA out of every test."""
    monkeypatch.setattr(data_files, "default_search_dirs", lambda name: [])
    monkeypatch.delenv(data.DATA_ENV_VAR, raising=False)


def load_small(folder: Path, **kwargs) -> data.Dataset:
    kwargs.setdefault("validation_size", 6)
    return data.load("fashion-mnist", data_dir=folder, **kwargs)


def first_pixel_ids(images: torch.Tensor) -> list[int]:
    return (images[:, 0] * 255).round().long().tolist()


# --------------------------------------------------------------------------------------------
# Finding and reading files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["unpacked", "gzipped"])
@pytest.mark.parametrize("layout", [".", "FashionMNIST/raw", "fashion-mnist"])
def test_load_from_data_dir(tmp_path: Path, gz: bool, layout: str) -> None:
    arrays = write_dataset(tmp_path / layout, gz=gz)
    ds = load_small(tmp_path)
    assert ds.name == "fashion-mnist"
    assert ds.image_shape == (1, 28, 28) and ds.data_dim == 784
    assert (len(ds.train), len(ds.validation), len(ds.test)) == (N_TRAIN - 6, 6, N_TEST)
    for split in (ds.train, ds.validation, ds.test):
        assert split.images.shape == (len(split), 784)
        assert split.images.dtype == torch.float32 and split.labels.dtype == torch.int64
        assert split.shape == (1, 28, 28)
        assert split.unflatten().shape == (len(split), 1, 28, 28)
        assert 0.0 <= float(split.images.min()) and float(split.images.max()) <= 1.0
    # Test split: every pixel and label as written, in order.
    expected = torch.from_numpy(arrays["test_images"].reshape(N_TEST, -1)).float() / 255
    torch.testing.assert_close(ds.test.images, expected)
    assert ds.test.labels.tolist() == arrays["test_labels"].tolist()
    # Train + validation: each training image once, with its own label.
    for split in (ds.train, ds.validation):
        ids = first_pixel_ids(split.images)
        assert split.labels.tolist() == arrays["train_labels"][ids].tolist()
        written = torch.from_numpy(arrays["train_images"][ids].reshape(len(ids), -1)).float()
        torch.testing.assert_close(split.images, written / 255)
    ids = first_pixel_ids(ds.train.images) + first_pixel_ids(ds.validation.images)
    assert sorted(ids) == list(range(N_TRAIN))


def test_load_from_env_and_data_dir_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_dataset(tmp_path / "env", seed=1)
    monkeypatch.setenv(data.DATA_ENV_VAR, str(tmp_path / "env"))
    from_env = data.load("mnist", validation_size=0.2)
    assert from_env.source == str(tmp_path / "env")
    assert len(from_env.validation) == 6
    write_dataset(tmp_path / "arg", seed=2)
    from_arg = data.load("mnist", data_dir=tmp_path / "arg", validation_size=0.2)
    assert from_arg.source == str(tmp_path / "arg")
    assert not torch.equal(from_env.test.images, from_arg.test.images)


def test_unpacked_preferred_and_mixed_files(tmp_path: Path) -> None:
    write_dataset(tmp_path, gz=True)
    # Replace one gzipped file by its unpacked twin: a mix of both kinds loads.
    gz_path = tmp_path / (FILES["test_labels"] + ".gz")
    (tmp_path / FILES["test_labels"]).write_bytes(gzip.decompress(gz_path.read_bytes()))
    gz_path.write_bytes(b"broken, and never read because the unpacked file comes first")
    assert len(load_small(tmp_path).test) == N_TEST


def test_default_search_dirs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert REAL_DEFAULT_SEARCH_DIRS("fashion-mnist") == [
        Path("/usr/share/datasets/fashion-mnist"),
        tmp_path / "ppl-vae" / "fashion-mnist",
    ]
    assert REAL_DEFAULT_SEARCH_DIRS("MNIST") == [tmp_path / "ppl-vae" / "mnist"]
    assert data.cache_dir("Fashion_MNIST") == tmp_path / "ppl-vae" / "fashion-mnist"


def test_not_found_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_files, "default_search_dirs", lambda name: [tmp_path / "cache"])
    with pytest.raises(DatasetNotFoundError) as info:
        data.load("fashion-mnist", data_dir=tmp_path / "nowhere")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data-dir" in message and "PPL_VAE_DATA" in message
    assert "ppl-vae download fashion-mnist" in message
    assert str(tmp_path / "nowhere") in message and str(tmp_path / "cache") in message
    assert "3 ways" in message

    with pytest.raises(DatasetNotFoundError) as info:
        data.load("mnist")
    assert "apt-get" not in str(info.value) and "ppl-vae download mnist" in str(info.value)


def test_not_found_names_incomplete_copy(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    (tmp_path / FILES["test_labels"]).unlink()
    with pytest.raises(DatasetNotFoundError, match="lacks t10k-labels-idx1-ubyte"):
        load_small(tmp_path)


def corrupt(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[: len(raw) - 7])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "header-only":
        path.write_bytes(raw[:6])
    elif how == "wrong-magic":
        path.write_bytes(b"\x00\x00\x08\x02" + raw[4:])
    elif how == "appended":
        path.write_bytes(raw + b"\x00junk")
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("role", sorted(FILES))
@pytest.mark.parametrize("how", ["truncated", "empty", "header-only", "wrong-magic", "appended"])
def test_corrupt_unpacked_file(tmp_path: Path, role: str, how: str) -> None:
    write_dataset(tmp_path)
    corrupt(tmp_path / FILES[role], how)
    with pytest.raises(DataError, match=FILES[role]) as info:
        load_small(tmp_path)
    assert "re-download" in str(info.value)


@pytest.mark.parametrize("how", ["truncated-stream", "bad-crc", "not-gzip-inside", "truncated-idx"])
def test_corrupt_gzipped_file(tmp_path: Path, how: str) -> None:
    write_dataset(tmp_path, gz=True)
    path = tmp_path / (FILES["train_images"] + ".gz")
    raw = path.read_bytes()
    if how == "truncated-stream":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "bad-crc":
        path.write_bytes(raw[:-8] + bytes(b ^ 0xFF for b in raw[-8:-4]) + raw[-4:])
    elif how == "not-gzip-inside":
        path.write_bytes(raw[:10] + b"\xff" * 40)
    else:
        payload = gzip.decompress(raw)
        path.write_bytes(gzip.compress(payload[:-100]))
    with pytest.raises(DataError, match=FILES["train_images"]):
        load_small(tmp_path)


def test_count_mismatch_names_both_files(tmp_path: Path) -> None:
    arrays = write_dataset(tmp_path)
    (tmp_path / FILES["train_labels"]).write_bytes(idx_labels(arrays["train_labels"][:-1]))
    with pytest.raises(DataError, match=r"holds 30 images but .* holds 29 labels") as info:
        load_small(tmp_path)
    assert FILES["train_images"] in str(info.value) and FILES["train_labels"] in str(info.value)


def test_wrong_image_size_and_bad_label(tmp_path: Path) -> None:
    arrays = write_dataset(tmp_path)
    (tmp_path / FILES["test_images"]).write_bytes(idx_images(arrays["test_images"][:, :27, :]))
    with pytest.raises(DataError, match=r"\(27, 28\) images"):
        load_small(tmp_path)
    write_dataset(tmp_path)
    labels = arrays["test_labels"].copy()
    labels[3] = 10
    (tmp_path / FILES["test_labels"]).write_bytes(idx_labels(labels))
    with pytest.raises(DataError, match="holds label 10"):
        load_small(tmp_path)


def test_read_idx_messages(tmp_path: Path) -> None:
    labels = tmp_path / "labels"
    labels.write_bytes(idx_labels(np.arange(5)))
    assert data.read_idx(labels, "labels").tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match="holds labels, not images"):
        data.read_idx(labels, "images")
    with pytest.raises(DataError, match="fix it like so"):
        data.read_idx(labels, "images", fix="fix it like so")
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        data.read_idx(tmp_path / "missing", "labels")
    huge = tmp_path / "huge.gz"
    huge.write_bytes(gzip.compress(struct.pack(">IIII", 0x803, 60000, 60000, 60000)))
    with pytest.raises(DataError, match="more than any dataset"):
        data.read_idx(huge, "images")


def test_debian_files_suggest_reinstall() -> None:
    fix = data_files._fix_for("fashion-mnist", data.DEBIAN_DIRS["fashion-mnist"] / "x.gz")
    assert "apt-get install --reinstall dataset-fashion-mnist" in fix


# --------------------------------------------------------------------------------------------
# Checks, splits, options
# --------------------------------------------------------------------------------------------


def tensors(n_train: int = 40, n_test: int = 10, d: int = 16) -> tuple:
    g = torch.Generator().manual_seed(0)
    train = (torch.rand(n_train, d, generator=g), torch.arange(n_train) % 10)
    test = (torch.rand(n_test, d, generator=g), torch.arange(n_test) % 10)
    return train, test


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_images_name_the_split(split: str, bad: float) -> None:
    train, test = tensors()
    (train if split == "train" else test)[0][3, 5] = bad
    with pytest.raises(DataError, match=f"split '{split}' contain.*first in image 3"):
        data.from_tensors("toy", train, test, image_shape=(1, 4, 4))


def test_from_tensors_checks() -> None:
    train, test = tensors()
    with pytest.raises(DataError, match="range over"):
        data.from_tensors("toy", (train[0] * 2, train[1]), test, image_shape=(1, 4, 4))
    with pytest.raises(DataError, match=r"dtype torch\.uint8"):
        data.from_tensors("toy", (train[0].byte(), train[1]), test, image_shape=(1, 4, 4))
    with pytest.raises(DataError, match="have shape"):
        data.from_tensors("toy", train, test, image_shape=(1, 4, 5))
    with pytest.raises(DataError, match="labels of split 'test'"):
        data.from_tensors("toy", train, (test[0], test[1][:-1]), image_shape=(1, 4, 4))
    with pytest.raises(DataError, match="leaves no training images"):
        data.from_tensors("toy", train, test, image_shape=(1, 4, 4), validation_size=40)
    with pytest.raises(DataError, match="binarize must be one of"):
        data.from_tensors("toy", train, test, image_shape=(1, 4, 4), binarize="yes")  # type: ignore[arg-type]
    ds = data.from_tensors(
        "toy",
        (train[0].view(40, 1, 4, 4), train[1]),
        test,
        image_shape=(1, 4, 4),
        validation_size=0,
        dtype=torch.float64,
    )
    assert ds.train.images.shape == (40, 16) and ds.train.images.dtype == torch.float64
    assert len(ds.validation) == 0


def test_load_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        data.load("cifar")
    write_dataset(tmp_path)
    with pytest.raises(DataError, match="leaves no training images"):
        data.load("fashion-mnist", data_dir=tmp_path)  # default validation_size is 10,000


def test_splits_deterministic_by_seed(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    a, b, c = (load_small(tmp_path, seed=s) for s in (3, 3, 4))
    assert torch.equal(a.validation.images, b.validation.images)
    assert torch.equal(a.train.labels, b.train.labels)
    assert first_pixel_ids(a.validation.images) != first_pixel_ids(c.validation.images)
    assert torch.equal(a.test.images, c.test.images)


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
    return data.load("digits")


def test_digits(digits: data.Dataset) -> None:
    sizes = [len(digits.train), len(digits.validation), len(digits.test)]
    assert sum(sizes) == 1797
    assert sizes == [1294, 144, 359]  # test: 20% of 1797; validation: 10% of the rest
    assert digits.image_shape == (1, 8, 8) and digits.train.images.shape[1] == 64
    all_images = torch.cat([digits.train.images, digits.validation.images, digits.test.images])
    assert float(all_images.min()) == 0.0 and float(all_images.max()) == 1.0
    torch.testing.assert_close(all_images * 16, (all_images * 16).round())  # grey levels 0..16
    assert set(digits.test.labels.tolist()) == set(range(10))
    other = data.load("digits", seed=1, binarize="static")
    assert torch.equal(
        other.test.labels, digits.test.labels
    )  # the digits test split does not depend on the seed


# Written out here from the datasets' own documentation (Zalando's Fashion-MNIST README lists
# the labels 0..9 in this order), not read from the library.
FASHION_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DIGIT_NAMES = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def test_class_names_table() -> None:
    assert set(data.CLASS_NAMES) == set(data.DATASETS)
    assert data.CLASS_NAMES["fashion-mnist"] == FASHION_NAMES
    assert data.CLASS_NAMES["mnist"] == data.CLASS_NAMES["digits"] == DIGIT_NAMES


def test_digits_class_names(digits: data.Dataset) -> None:
    assert digits.class_names == DIGIT_NAMES and digits.num_classes == 10
    labels = torch.cat([digits.train.labels, digits.validation.labels, digits.test.labels])
    assert set(labels.tolist()) == set(range(digits.num_classes))


@pytest.mark.parametrize(
    ("name", "expected"), [("fashion-mnist", FASHION_NAMES), ("mnist", DIGIT_NAMES)]
)
def test_idx_dataset_class_names(tmp_path: Path, name: str, expected: tuple) -> None:
    write_dataset(tmp_path)
    ds = data.load(name, data_dir=tmp_path, validation_size=6)
    assert ds.class_names == expected and ds.num_classes == 10
    assert data.load(name.upper(), data_dir=tmp_path, validation_size=6).class_names == expected


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason=f"Fashion-MNIST is not in {FASHION_DIR}")
def test_installed_fashion_mnist_class_names() -> None:
    ds = data.load("fashion-mnist", data_dir=FASHION_DIR)
    assert ds.class_names == FASHION_NAMES and ds.num_classes == 10
    # Every class appears in the test set, and every label names one of the ten.
    assert set(ds.test.labels.tolist()) == set(range(10))
    assert (len(ds.train), len(ds.validation), len(ds.test)) == (50_000, 10_000, 10_000)


def test_from_tensors_class_names() -> None:
    train, test = tensors()
    # By default the labels' own values, 0 up to the largest label of either split.
    assert data.from_tensors("toy", train, test, image_shape=(1, 4, 4)).class_names == DIGIT_NAMES
    small_train = (train[0], torch.arange(40) % 3)  # labels 0..2 here, up to 4 in the test split
    small_test = (test[0], torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4]))
    ds = data.from_tensors("toy", small_train, small_test, image_shape=(1, 4, 4))
    assert ds.class_names == ("0", "1", "2", "3", "4") and ds.num_classes == 5
    names = ["cat", "dog", "bird", "fish", "frog"]
    ds = data.from_tensors("toy", small_train, small_test, image_shape=(1, 4, 4), class_names=names)
    assert ds.class_names == tuple(names) and ds.num_classes == 5
    # Names for classes absent from the tensors are allowed (a subset of a larger dataset).
    more = data.from_tensors(
        "toy", small_train, small_test, image_shape=(1, 4, 4), class_names=[*names, "newt"]
    )
    assert more.num_classes == 6


def test_from_tensors_class_names_checks() -> None:
    train, test = tensors()
    with pytest.raises(DataError, match=r"9 class_names for labels up to 9: 10 classes"):
        data.from_tensors("toy", train, test, image_shape=(1, 4, 4), class_names=DIGIT_NAMES[:9])
    only_test_high = (train[0], torch.zeros(40, dtype=torch.long))
    with pytest.raises(DataError, match="2 class_names for labels up to 9"):
        data.from_tensors(
            "toy", only_test_high, test, image_shape=(1, 4, 4), class_names=["a", "b"]
        )
    with pytest.raises(DataError, match="sequence of strings"):
        data.from_tensors("toy", train, test, image_shape=(1, 4, 4), class_names="0123456789")
    with pytest.raises(DataError, match="sequence of strings"):
        data.from_tensors("toy", train, test, image_shape=(1, 4, 4), class_names=list(range(10)))
    with pytest.raises(DataError, match=r"repeat \['b'\]"):
        names = ["a", "b", "b", *DIGIT_NAMES[3:]]
        data.from_tensors("toy", train, test, image_shape=(1, 4, 4), class_names=names)
    with pytest.raises(DataError, match="split 'test' include -1"):
        data.from_tensors("toy", train, (test[0], test[1] - 1), image_shape=(1, 4, 4))


def test_device_and_dtype(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    ds = load_small(tmp_path, dtype=torch.float64, device=torch.device("cpu"))
    assert ds.train.images.dtype == torch.float64 and ds.train.images.device.type == "cpu"


# --------------------------------------------------------------------------------------------
# Binarisation
# --------------------------------------------------------------------------------------------


def is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
def test_binarize_statistics(p: float) -> None:
    n = 200_000
    x = data.binarize(torch.full((n,), p), torch.Generator().manual_seed(7))
    assert is_binary(x) and x.dtype == torch.float32
    # The mean of n Bernoulli(p) draws has standard error sqrt(p(1-p)/n); a seeded draw
    # outside 4 standard errors (probability 6e-5 for an honest sampler) means a biased one.
    assert abs(float(x.mean()) - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_binarize_edges() -> None:
    x = torch.tensor([0.0, 1.0] * 1000)
    assert torch.equal(data.binarize(x), x)
    with pytest.raises(DataError, match="floating-point"):
        data.binarize(torch.ones(3, dtype=torch.uint8))


def test_static_binarization_statistics() -> None:
    p, n_train, d = 0.3, 400, 100
    train = (torch.full((n_train, d), p), torch.zeros(n_train, dtype=torch.long))
    test = (torch.full((50, d), p), torch.zeros(50, dtype=torch.long))
    ds = data.from_tensors("grey", train, test, image_shape=(1, 10, 10), binarize="static")
    for split in (ds.train, ds.validation, ds.test):
        assert is_binary(split.images)
        n = split.images.numel()
        # Within 4 standard errors sqrt(p(1-p)/n) of p, as above.
        assert abs(float(split.images.mean()) - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_static_reproducible(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    a, b, c = (load_small(tmp_path, binarize="static", seed=s) for s in (0, 0, 1))
    assert a.binarize == "static"
    for split in ("train", "validation", "test"):
        assert is_binary(getattr(a, split).images)
        assert torch.equal(getattr(a, split).images, getattr(b, split).images)
    assert not torch.equal(a.train.images, c.train.images)
    assert torch.equal(a.test.images, c.test.images)  # the test draw is fixed


def test_dynamic(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    a = load_small(tmp_path, binarize="dynamic", seed=0)
    b = load_small(tmp_path, binarize="dynamic", seed=5)
    static = load_small(tmp_path, binarize="static", seed=0)
    grey = load_small(tmp_path, seed=0)
    assert torch.equal(a.train.images, grey.train.images)  # train stays grey
    assert not is_binary(a.train.images)
    assert is_binary(a.validation.images) and is_binary(a.test.images)
    assert torch.equal(a.test.images, b.test.images)  # the same test set for every seed
    assert torch.equal(a.test.images, static.test.images)
    assert torch.equal(a.validation.images, static.validation.images)

    g = torch.Generator().manual_seed(0)
    epoch1 = torch.cat(list(a.train_batches(8, shuffle=False, generator=g)))
    epoch2 = torch.cat(list(a.train_batches(8, shuffle=False, generator=g)))
    assert is_binary(epoch1) and is_binary(epoch2)
    assert not torch.equal(epoch1, epoch2)  # a fresh draw each epoch
    g = torch.Generator().manual_seed(0)
    again = torch.cat(list(a.train_batches(8, shuffle=False, generator=g)))
    assert torch.equal(epoch1, again)  # reproducible from the generator's seed
    assert torch.equal(a.train.images, grey.train.images)  # the batches left the data grey


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,batch_size", [(10, 3), (12, 4), (5, 8), (1, 1)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_cover_each_index_once(n: int, batch_size: int, drop_last: bool) -> None:
    images = torch.arange(n, dtype=torch.float32).unsqueeze(1).expand(n, 3).contiguous()
    labels = torch.arange(n) * 10
    g = torch.Generator().manual_seed(1)
    out = list(data.batches(images, batch_size, labels=labels, generator=g, drop_last=drop_last))
    sizes = [x.shape[0] for x, _ in out]
    full, rest = divmod(n, batch_size)
    assert sizes == [batch_size] * full + ([rest] if rest and not drop_last else [])
    seen = torch.cat([x[:, 0] for x, _ in out]).long().tolist() if out else []
    assert len(seen) == len(set(seen)) == sum(sizes)
    if not drop_last:
        assert sorted(seen) == list(range(n))
    for x, y in out:
        assert torch.equal(y, x[:, 0].long() * 10)  # labels follow their images


def test_batches_shuffle_and_order() -> None:
    images = torch.arange(100, dtype=torch.float32).unsqueeze(1)
    in_order = torch.cat(list(data.batches(images, 7, shuffle=False)))
    assert torch.equal(in_order, images)
    g = torch.Generator().manual_seed(0)
    e1 = torch.cat(list(data.batches(images, 7, generator=g)))
    e2 = torch.cat(list(data.batches(images, 7, generator=g)))
    assert not torch.equal(e1, e2)  # one new permutation per epoch
    assert torch.equal(e1.sort(0).values, images)
    assert list(data.batches(images[:0], 4)) == []


def test_batches_errors() -> None:
    images = torch.zeros(10, 2)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(DataError, match="batch_size"):
            data.batches(images, bad)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="one entry per image"):
        data.batches(images, 2, labels=torch.zeros(9))
