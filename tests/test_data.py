"""lipcert.data: dataset shapes and determinism, IDX / CIFAR readers on tiny files, downloads
(MD5 and atomic write, no network), augmentations, and the Normalize layer's exact bound."""

from __future__ import annotations

import gzip
import shutil
import struct
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lipschitz import jacobian_spectral_norm
from torch import nn

from lipcert.bounds.network import lipschitz_upper_bound
from lipcert.data.augment import BatchAugment, random_crop, random_flip
from lipcert.data.cifar import load_cifar10, read_cifar_binary
from lipcert.data.digits import load_digits
from lipcert.data.download import SOURCES, _extract, download, fetch, file_md5, verify_md5
from lipcert.data.idx import (
    IDX_FILES,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    read_idx,
)
from lipcert.data.moons import load_moons
from lipcert.data.normalize import Normalize
from lipcert.data.paths import find_dataset_folder
from lipcert.data.registry import DATASET_NAMES, load_dataset
from lipcert.export import export

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Where the original MNIST files live on the dev machines (see shared/datasets/README.md).
SHARED_CANDIDATES = (Path("/work/shared/datasets"), REPO_ROOT.parent / "shared" / "datasets")
#: Label counts published in shared/datasets/README.md.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
#: RFC 1321, appendix A.5 test suite.
MD5_EMPTY, MD5_ABC = "d41d8cd98f00b204e9800998ecf8427e", "900150983cd24fb0d6963f7d28e17f72"


# ----------------------------------------------------------------------------- helpers


def _idx_bytes(magic: int, array: np.ndarray) -> bytes:
    return struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.tobytes()


def _write_gz(path: Path, payload: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload))
    return path


def _tiny_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 4, 5), dtype=np.uint8)


def _write_tiny_mnist(folder: Path) -> dict[str, np.ndarray]:
    arrays = {
        TRAIN_IMAGES: _tiny_images(6, 0),
        TRAIN_LABELS: np.arange(6, dtype=np.uint8),
        TEST_IMAGES: _tiny_images(3, 1),
        TEST_LABELS: np.array([9, 0, 4], dtype=np.uint8),
    }
    for name, array in arrays.items():
        magic = IDX_IMAGES_MAGIC if array.ndim == 3 else IDX_LABELS_MAGIC
        _write_gz(folder / name, _idx_bytes(magic, array))
    return arrays


def _cifar_records(labels: list[int], seed: int) -> tuple[bytes, np.ndarray]:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    records = np.concatenate([np.array(labels, dtype=np.uint8)[:, None], pixels], axis=1)
    return records.tobytes(), pixels.reshape(-1, 3, 32, 32)  # (N, 3, 32, 32)


def _write_tiny_cifar(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        (folder / f"data_batch_{i}.bin").write_bytes(_cifar_records([i, 0], seed=i)[0])
    (folder / "test_batch.bin").write_bytes(_cifar_records([9, 8, 7], seed=0)[0])


def _shared_datasets() -> Path | None:
    return next((p for p in SHARED_CANDIDATES if (p / "mnist" / TRAIN_IMAGES).is_file()), None)


# ----------------------------------------------------------------------------- digits, moons


def test_digits_shapes_ranges_split():
    data = load_digits()
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    assert (len(data.train), len(data.test)) == (1347, 450)
    for split in (data.train, data.test):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert split.x.min() >= 0 and split.x.max() <= 1
    assert data.train.x.max() == 1  # 16 / 16 occurs
    # stratified: every class keeps its share (within one image) in the test split
    total = torch.bincount(torch.cat([data.train.y, data.test.y]))
    assert (torch.bincount(data.test.y) - total * 0.25).abs().max() <= 1


def test_digits_and_moons_are_deterministic():
    a, b = load_digits(), load_digits()
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(load_digits(seed=1).test.y, a.test.y)
    m1, m2 = load_moons(), load_moons()
    assert torch.equal(m1.train.x, m2.train.x) and torch.equal(m1.test.x, m2.test.x)
    assert not torch.equal(m1.train.x[:500], m1.test.x)


def test_moons_shapes_labels():
    data = load_dataset("moons", n_train=40, n_test=20, noise=0.05)
    assert data.train.x.shape == (40, 2) and data.test.x.shape == (20, 2)
    assert data.train.x.dtype == torch.float32 and data.input_shape == (2,)
    assert set(data.train.y.tolist()) == {0, 1} and data.num_classes == 2
    with pytest.raises(ValueError, match="noise"):
        load_moons(noise=-1.0)


def test_public_names_import():
    import lipcert.data

    for name in lipcert.data.__all__:
        assert getattr(lipcert.data, name) is not None


def test_load_dataset_arguments():
    with pytest.raises(ValueError, match=r"digits, moons, mnist, fashion-mnist, cifar10"):
        load_dataset("svhn")
    assert set(DATASET_NAMES) == {"digits", "moons", "mnist", "fashion-mnist", "cifar10"}
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("digits", data_dir="somewhere")
    with pytest.raises(ValueError, match="n_train"):
        load_dataset("moons", n_trian=3)
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("mnist", noise=0.1)


# ----------------------------------------------------------------------------- IDX


def test_read_idx_roundtrip(tmp_path):
    images = _tiny_images(3, 0)
    path = _write_gz(tmp_path / "img.gz", _idx_bytes(IDX_IMAGES_MAGIC, images))
    got = read_idx(path, IDX_IMAGES_MAGIC)
    assert got.dtype == torch.uint8 and torch.equal(got, torch.from_numpy(images))


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (_idx_bytes(IDX_LABELS_MAGIC, np.zeros(3, np.uint8)), "magic 0x00000801"),
        (_idx_bytes(IDX_IMAGES_MAGIC, _tiny_images(3, 0))[:-7], "payload"),
        (_idx_bytes(IDX_IMAGES_MAGIC, _tiny_images(3, 0)) + b"\0", "payload"),
        (b"\0\0\x08", "header"),
    ],
    ids=["bad-magic", "truncated-payload", "extra-bytes", "truncated-header"],
)
def test_read_idx_rejects_corrupt_payload(tmp_path, payload, match):
    path = _write_gz(tmp_path / "bad-idx.gz", payload)
    with pytest.raises(ValueError, match=match) as info:
        read_idx(path, IDX_IMAGES_MAGIC)
    assert "bad-idx.gz" in str(info.value)


def test_read_idx_rejects_bad_gzip(tmp_path):
    good = gzip.compress(_idx_bytes(IDX_IMAGES_MAGIC, _tiny_images(3, 0)))
    for name, raw in (("plain.gz", b"not gzip at all"), ("cut.gz", good[: len(good) // 2])):
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(ValueError, match=name):
            read_idx(tmp_path / name, IDX_IMAGES_MAGIC)


def _refusal_and_peak(path, magic: int) -> tuple[str, int]:
    """The message of the ValueError ``read_idx`` raises for ``path`` and its peak Python
    memory (tracemalloc) meanwhile."""
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as info:
            read_idx(path, magic)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return str(info.value), peak


#: A gzip bomb posing as MNIST: this many zero bytes (10 KiB compressed) after a valid header.
BOMB_BYTES = 10 << 20


@pytest.mark.parametrize(
    ("extra", "found"), [(BOMB_BYTES, "over 8"), (-1, "7")], ids=["bomb", "cut"]
)
def test_read_idx_inflates_no_more_than_the_header_declares(tmp_path, extra, found):
    """The stream was inflated whole before its header was read: a 1 MB file of zeros behind a
    header declaring 8 bytes took 2.3 GB of memory to be refused. The payload is now read up to
    one byte past the declared size."""
    raw = _idx_bytes(IDX_IMAGES_MAGIC, np.zeros((2, 2, 2), np.uint8))
    path = _write_gz(
        tmp_path / "bomb-idx3-ubyte.gz", raw + bytes(extra) if extra > 0 else raw[:extra]
    )
    assert path.stat().st_size < BOMB_BYTES // 100
    message, peak = _refusal_and_peak(path, IDX_IMAGES_MAGIC)
    assert message == (
        f"{path}: the header declares shape (2, 2, 2), 8 bytes, but the payload after it is "
        f"{found} bytes (truncated or corrupt file)"
    )
    assert peak < BOMB_BYTES // 10, peak


def test_read_idx_refuses_a_header_declaring_more_than_the_file_can_hold(tmp_path):
    """A header declaring 2^32 - 1 labels in front of 50 MiB of zeros (a 50 KiB file): the cap
    at the declared size let 50 MiB (600 MiB in the review's repro) be inflated before the stream
    ended short. Deflate expands at most 1032:1, so the header is refused before any inflating."""
    header = struct.pack(">II", IDX_LABELS_MAGIC, 2**32 - 1)
    path = _write_gz(tmp_path / "liar-idx1-ubyte.gz", header + bytes(50 << 20))
    size = path.stat().st_size
    message, peak = _refusal_and_peak(path, IDX_LABELS_MAGIC)
    assert message == (
        f"{path}: the header declares shape ({2**32 - 1},), {2**32 - 1} bytes, more than a gzip "
        f"file of {size} bytes can hold (at most {1032 * size}: deflate expands at most 1032:1; "
        "truncated or corrupt file)"
    )
    assert peak < 1 << 20, peak


def test_load_mnist_layout_from_tiny_files(tmp_path):
    arrays = _write_tiny_mnist(tmp_path / "mnist")
    data = load_dataset("mnist", data_dir=tmp_path)
    assert data.train.x.shape == (6, 1, 4, 5) and data.test.x.shape == (3, 1, 4, 5)
    expected = torch.from_numpy(arrays[TEST_IMAGES]).float().unsqueeze(1) / 255
    assert torch.equal(data.test.x, expected)
    assert data.test.y.tolist() == [9, 0, 4] and data.test.y.dtype == torch.int64
    # data_dir may also be the dataset folder itself
    assert len(load_dataset("mnist", data_dir=tmp_path / "mnist").train) == 6


def test_missing_files_name_paths_and_download(tmp_path):
    _write_tiny_mnist(tmp_path / "mnist")
    (tmp_path / "mnist" / TEST_LABELS).unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("mnist", data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "mnist" / TEST_LABELS) in message and "download" in message


def test_mismatched_counts_and_labels_rejected(tmp_path):
    folder = tmp_path / "fashion-mnist"
    _write_tiny_mnist(folder)
    _write_gz(folder / TEST_LABELS, _idx_bytes(IDX_LABELS_MAGIC, np.array([1, 2], np.uint8)))
    with pytest.raises(ValueError, match="3 images but"):
        load_dataset("fashion-mnist", data_dir=tmp_path)
    _write_gz(folder / TEST_LABELS, _idx_bytes(IDX_LABELS_MAGIC, np.array([1, 2, 10], np.uint8)))
    with pytest.raises(ValueError, match="label 10"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


@pytest.fixture(scope="module")
def mnist():
    root = _shared_datasets()
    if root is None:
        pytest.skip(f"original MNIST files absent from {[str(p) for p in SHARED_CANDIDATES]}")
    return load_dataset("mnist", data_dir=root)


def test_real_mnist(mnist):
    assert (len(mnist.train), len(mnist.test)) == (60000, 10000)
    assert mnist.input_shape == (1, 28, 28)
    assert torch.bincount(mnist.train.y).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(mnist.test.y).tolist() == MNIST_TEST_COUNTS
    assert mnist.train.x.min() == 0 and mnist.train.x.max() == 1


def test_default_search_finds_shared_mnist():
    """Without data_dir, ../shared/datasets relative to the repository is searched first."""
    shared = REPO_ROOT.parent / "shared" / "datasets"
    if not (shared / "mnist" / TRAIN_IMAGES).is_file():
        pytest.skip(f"no MNIST under {shared} beside the repository")
    found = find_dataset_folder("mnist", "mnist", IDX_FILES, data_dir=None)
    assert found == (shared / "mnist").resolve()


# ----------------------------------------------------------------------------- CIFAR-10


def test_read_cifar_binary_planes(tmp_path):
    raw, pixels = _cifar_records([3, 1, 4, 1, 5], seed=0)
    (tmp_path / "b.bin").write_bytes(raw)
    images, labels = read_cifar_binary(tmp_path / "b.bin")
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == [3, 1, 4, 1, 5] and labels.dtype == torch.int64
    assert torch.equal(images, torch.from_numpy(pixels))
    # byte 1 + 1024 of a record is the first green pixel (R plane, then G, then B)
    assert int(images[0, 1, 0, 0]) == raw[1 + 1024]


def test_read_cifar_binary_rejects_corrupt(tmp_path):
    raw, _ = _cifar_records([0, 1], seed=0)
    (tmp_path / "cut.bin").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match=r"cut\.bin"):
        read_cifar_binary(tmp_path / "cut.bin")
    (tmp_path / "label.bin").write_bytes(bytes([10]) + raw[1:])
    with pytest.raises(ValueError, match=r"label\.bin"):
        read_cifar_binary(tmp_path / "label.bin")


def test_load_cifar10_from_tiny_files(tmp_path):
    _write_tiny_cifar(tmp_path / "cifar10" / "cifar-10-batches-bin")
    data = load_dataset("cifar10", data_dir=tmp_path)
    assert data.train.x.shape == (10, 3, 32, 32) and data.test.x.shape == (3, 3, 32, 32)
    assert data.train.y.tolist() == [1, 0, 2, 0, 3, 0, 4, 0, 5, 0]
    assert data.train.x.min() >= 0 and data.train.x.max() <= 1 and data.num_classes == 10


def _tiny_cifar_archive(folder: Path) -> Path:
    """A tar.gz of the tiny CIFAR batches laid out as the original archive, in ``folder``."""
    _write_tiny_cifar(folder / "src" / "cifar-10-batches-bin")
    archive = folder / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder / "src" / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
    return archive


def test_cifar_archive_extraction(tmp_path):
    """The download's extraction step takes exactly the named members out of a tar.gz."""
    archive = _tiny_cifar_archive(tmp_path)
    _extract(archive, SOURCES["cifar10"].extract, tmp_path / "out" / "cifar10")
    data = load_cifar10(data_dir=tmp_path / "out")
    assert len(data.train) == 10 and len(data.test) == 3
    with pytest.raises(ValueError, match="missing"):
        _extract(archive, ["cifar-10-batches-bin/nope.bin"], tmp_path / "out")


def test_cifar_extraction_replaces_a_damaged_file_of_the_right_size(tmp_path):
    """An extracted batch was reused when its size was the member's: one zeroed in place stayed
    (CIFAR then loaded with wrong labels and pixels). It is now compared with the archive."""
    archive = _tiny_cifar_archive(tmp_path)
    folder = tmp_path / "out" / "cifar10"
    _extract(archive, SOURCES["cifar10"].extract, folder)
    damaged, intact = (
        folder / "cifar-10-batches-bin" / n for n in ("data_batch_1.bin", "test_batch.bin")
    )
    good, inode = damaged.read_bytes(), intact.stat().st_ino
    damaged.write_bytes(bytes(len(good)))
    _extract(archive, SOURCES["cifar10"].extract, folder)
    assert damaged.read_bytes() == good
    assert intact.stat().st_ino == inode  # a file holding its member's bytes is not rewritten


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_extraction_of_a_link_to_a_file_outside_the_archive_names_the_link(tmp_path, kind):
    """A member that links to a path the archive does not hold was reported "missing" (it is
    there: its target is not), and is not followed outside the archive."""
    archive = tmp_path / "links.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("batches/data.bin")
        info.type, info.linkname = kind, "/etc/hostname"
        tar.addfile(info)
    with pytest.raises(ValueError, match=r"batches/data\.bin is a link to /etc/hostname, which"):
        _extract(archive, ["batches/data.bin"], tmp_path / "out")
    assert not (tmp_path / "out" / "batches" / "data.bin").exists()


# ----------------------------------------------------------------------------- downloads


def test_md5_check_on_local_files(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "abc").write_bytes(b"abc")
    assert file_md5(tmp_path / "empty") == MD5_EMPTY and file_md5(tmp_path / "abc") == MD5_ABC
    verify_md5(tmp_path / "abc", MD5_ABC.upper())
    with pytest.raises(ValueError, match="abc"):
        verify_md5(tmp_path / "abc", MD5_EMPTY)
    assert SOURCES["cifar10"].files == (
        ("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530"),
    )


def test_fetch_is_atomic_and_checks_md5(tmp_path):
    """fetch through file:// URLs (no network): a wrong MD5 leaves nothing behind."""
    (tmp_path / "remote").write_bytes(b"abc")
    good, missing = (tmp_path / "remote").as_uri(), (tmp_path / "gone").as_uri()
    dest_dir = tmp_path / "dest"
    dest_dir.mkdir()
    with pytest.raises(OSError, match="MD5"):
        fetch([good], dest_dir / "file", MD5_EMPTY)
    assert list(dest_dir.iterdir()) == []
    fetch([missing, good], dest_dir / "file", MD5_ABC)  # falls back to the next mirror
    assert (dest_dir / "file").read_bytes() == b"abc" and len(list(dest_dir.iterdir())) == 1


def test_download_keeps_verified_files(tmp_path):
    """Files already present with the published MD5 are not fetched again (no network used)."""
    shared = _shared_datasets()
    if shared is None:
        pytest.skip(f"original MNIST files absent from {[str(p) for p in SHARED_CANDIDATES]}")
    shutil.copytree(shared / "mnist", tmp_path / "mnist")
    assert download("mnist", tmp_path) == tmp_path / "mnist"
    with pytest.raises(ValueError, match="cifar10"):
        download("svhn", tmp_path)


# ----------------------------------------------------------------------------- augment


def test_random_crop_is_a_shifted_window():
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6) + 1
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = nn.functional.pad(x, (2, 2, 2, 2))  # (B, C, 9, 10)
    for b in range(2):
        windows = [padded[b, :, i : i + 5, j : j + 6] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[b], w) for w in windows)
    assert torch.equal(random_crop(x, 0), x)


def test_random_flip():
    x = torch.randn(8, 2, 3, 5)
    assert torch.equal(random_flip(x, p=1.0), x.flip(-1))
    assert torch.equal(random_flip(x, p=0.0), x)
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = torch.tensor([not torch.equal(o, xi) for o, xi in zip(out, x, strict=True)])
    assert torch.equal(out[flipped], x[flipped].flip(-1)) and 0 < int(flipped.sum()) < len(x)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\).*\(2, 3\)"):
        random_flip(torch.zeros(2, 3))


def test_batch_augment_deterministic_and_resumable():
    x = torch.rand(16, 3, 8, 8)
    a, b = BatchAugment(crop_padding=2, flip=True, seed=3), BatchAugment(2, True, seed=3)
    first = a(x)
    assert torch.equal(first, b(x)) and first.shape == x.shape
    assert not torch.equal(first, BatchAugment(2, True, seed=4)(x))
    state = a.state_dict()
    second = a(x)
    a.load_state_dict(state)
    assert torch.equal(a(x), second)
    with pytest.raises(ValueError, match="crop_padding"):
        BatchAugment(crop_padding=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_augment_stays_on_device():
    x = torch.rand(4, 3, 8, 8, device="cuda")
    out = BatchAugment(crop_padding=2, flip=True)(x)
    assert out.device == x.device
    on_gpu = BatchAugment(crop_padding=2, flip=True, generator_device="cuda")
    assert on_gpu(x).device == x.device


# ----------------------------------------------------------------------------- Normalize


@given(
    channels=st.integers(1, 4),
    size=st.integers(1, 4),
    stds=st.lists(st.floats(0.05, 3.0), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_normalize_bound_is_exact_jacobian_norm(channels, size, stds, seed):
    mean = torch.rand(channels, generator=torch.Generator().manual_seed(seed))
    layer = Normalize(mean, stds[:channels])
    bound = layer.lipschitz_bound()
    x = torch.randn(channels, size, size, dtype=torch.float64)
    for mode in (True, False):
        layer.train(mode)
        exact = jacobian_spectral_norm(layer.double(), x)
        assert exact <= bound <= exact * (1 + 1e-12)
    assert bound == pytest.approx(1 / min(layer.std.tolist()), rel=1e-12)


def test_normalize_forward_export_and_network_bound():
    layer = Normalize([0.5, 0.25], [0.2, 0.4])
    x = torch.rand(3, 2, 4, 4)
    mean, std = torch.tensor([0.5, 0.25]), torch.tensor([0.2, 0.4])
    expected = (x - mean[:, None, None]) / std[:, None, None]
    assert torch.allclose(layer(x), expected)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(32, 3))
    plain = export(model)
    assert (plain(x) - model(x)).abs().max() <= 1e-5
    linear_bound = lipschitz_upper_bound(model[2])
    assert lipschitz_upper_bound(model, input_shape=(2, 4, 4)) == pytest.approx(
        linear_bound * layer.lipschitz_bound()
    )
    features = Normalize([0.0, 1.0], [1.0, 2.0])(torch.ones(5, 2))  # (N, D) inputs work too
    assert torch.equal(features[0], torch.tensor([1.0, 0.0]))


def test_normalize_onnx_export(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = nn.Sequential(Normalize([0.1, 0.2], [0.3, 0.5]), nn.Flatten(), nn.Linear(18, 2))
    export(model, onnx_path=tmp_path / "m.onnx", input_shape=(2, 3, 3))
    x = torch.rand(4, 2, 3, 3)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    (out,) = session.run(None, {"input": x.numpy()})
    assert np.abs(out - model(x).detach().numpy()).max() <= 1e-5


def test_normalize_state_dict_from_data_and_errors():
    x = torch.rand(64, 3, 4, 4) * torch.tensor([1.0, 2.0, 3.0])[:, None, None]
    layer = Normalize.from_data(x)
    z = layer(x).transpose(0, 1).reshape(3, -1)  # (C, N * H * W)
    assert torch.allclose(z.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(z.std(1, correction=0), torch.ones(3), atol=1e-5)
    copy = Normalize([0.0] * 3, [1.0] * 3)
    assert set(layer.state_dict()) == {"mean", "std"}  # buffers, no trainable parameters
    assert not list(layer.parameters())
    copy.load_state_dict(layer.state_dict())
    assert copy.lipschitz_bound() == layer.lipschitz_bound()
    assert torch.equal(copy(x), layer(x))
    with pytest.raises(ValueError, match=r"Normalize.*\(N, 3, \.\.\.\).*\(2, 4, 4, 4\)"):
        layer(torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match="std must be positive"):
        Normalize([0.0], [0.0])
    with pytest.raises(ValueError, match="mean and std"):
        Normalize([0.0, 1.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        Normalize([float("nan")], [1.0])
