"""Datasets: embedded (8x8 digits), synthetic with exact log p(x), and binarized MNIST read or downloaded once.

Every loader takes ``(seed, data_dir)`` and returns a :class:`Dataset` with
train / valid / test splits as float32 ``[N, D]`` tensors. What the seed fixes:

- ``digits``: the random split of the 1797 images (1297 / 250 / 250).
- synthetic sets: the draws of every split (the generating model is fixed, so
  every seed poses the same problem with fresh samples).
- ``binarized-mnist``: nothing; its 50k / 10k / 10k split is the published one.

Binarized MNIST is looked for in this order: the ``data_dir`` argument,
``$ELBO_BENCH_DATA``, the user cache (``$XDG_CACHE_HOME/elbo-bench`` or
``~/.cache/elbo-bench``); if none holds it, the three original ``.amat`` files
are downloaded once into the cache and converted to the packed ``.npz`` form.
Whatever is loaded is checked against the published sha256 digests.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DATA_ENV = "ELBO_BENCH_DATA"
SPLITS = ("train", "valid", "test")
KIND_LIKELIHOOD = {"binary": "bernoulli", "real": "gaussian"}  # the decoder likelihood each kind of data needs


class DataNotFoundError(FileNotFoundError):
    """A data file is neither present locally nor downloadable; the message says where to put it."""


class DataIntegrityError(ValueError):
    """A data file's contents do not match the published digests."""


class UnknownDatasetError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Tensor  # float32 [N_train, D]
    valid: Tensor  # float32 [N_valid, D]
    test: Tensor  # float32 [N_test, D]
    kind: str  # "binary" or "real"
    image_shape: tuple[int, int] | None  # (28, 28), (8, 8) or None for non-image data
    exact_log_density: Callable[[Tensor], Tensor] | None = None  # true log p(x), [B] float64, synthetic data only

    def __post_init__(self) -> None:
        if self.kind not in KIND_LIKELIHOOD:
            raise ValueError(f"unknown data kind {self.kind!r}; choices: {', '.join(sorted(KIND_LIKELIHOOD))}")
        dims = {self.split(s).shape[1] for s in SPLITS}
        if len(dims) != 1 or any(self.split(s).dim() != 2 for s in SPLITS):
            raise ValueError(f"dataset {self.name!r}: splits must be [N, D] with one D, got "
                             f"{[tuple(self.split(s).shape) for s in SPLITS]}")

    def split(self, name: str) -> Tensor:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; choices: {', '.join(SPLITS)}")
        return getattr(self, name)

    @property
    def data_dim(self) -> int:
        return self.train.shape[1]

    @property
    def likelihood(self) -> str:
        return KIND_LIKELIHOOD[self.kind]


# --- registry --------------------------------------------------------------------------------------

Loader = Callable[[int, Path | None], Dataset]


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    loader: Loader
    description: str  # one line, shown by `python -m bench list datasets`


_DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(name: str, *, description: str):
    """Decorator registering ``loader(seed, data_dir) -> Dataset`` under ``name`` (unique)."""

    def decorate(loader: Loader) -> Loader:
        if name in _DATASETS:
            raise ValueError(f"dataset {name!r} is already registered (by {_DATASETS[name].loader.__module__})")
        _DATASETS[name] = DatasetEntry(name, loader, description)
        return loader

    return decorate


def load_dataset(name: str, *, seed: int = 0, data_dir: str | Path | None = None) -> Dataset:
    if name not in _DATASETS:
        raise UnknownDatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}")
    dataset = _DATASETS[name].loader(seed, None if data_dir is None else Path(data_dir))
    assert dataset.name == name, (dataset.name, name)
    return dataset


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def dataset_descriptions() -> dict[str, str]:
    return {name: _DATASETS[name].description for name in list_datasets()}


def _rng(seed: int, tag: str) -> np.random.Generator:
    """A numpy generator for (seed, dataset): different datasets with one seed do not share draws."""
    return np.random.default_rng([seed, int.from_bytes(hashlib.sha256(tag.encode()).digest()[:4], "little")])


def _torch_generator(seed: int, tag: str) -> torch.Generator:
    return torch.Generator().manual_seed(int(_rng(seed, tag).integers(2**62)))


def _split_rows(data: np.ndarray, sizes: tuple[int, int, int], rng: np.random.Generator) -> tuple[Tensor, ...]:
    order = rng.permutation(len(data))
    bounds = np.cumsum((0, *sizes))
    return tuple(torch.from_numpy(np.ascontiguousarray(data[order[a:b]], dtype=np.float32))
                 for a, b in itertools.pairwise(bounds))


# --- 8x8 digits ------------------------------------------------------------------------------------

DIGITS_SIZES = (1297, 250, 250)  # of scikit-learn's 1797 images


@register_dataset("digits",
                  description="scikit-learn 8x8 digits, binarized at 0.5 (1297/250/250, split by seed); embedded")
def _load_digits(seed: int, data_dir: Path | None) -> Dataset:
    from sklearn.datasets import load_digits

    pixels = load_digits().data / 16.0  # intensities 0..16
    binary = (pixels > 0.5).astype(np.float32)
    train, valid, test = _split_rows(binary, DIGITS_SIZES, _rng(seed, "digits"))
    return Dataset("digits", train, valid, test, kind="binary", image_shape=(8, 8))


# --- synthetic data with exact log p(x) ------------------------------------------------------------

SYNTHETIC_SIZES = (2000, 500, 500)
LINEAR_GAUSSIAN_DIMS = (20, 5)  # (d, q)
LINEAR_GAUSSIAN_MODEL_SEED = 20  # fixes the true parameters: every data seed poses the same problem


def true_linear_gaussian():
    """The generating probabilistic-PCA model of the ``linear-gaussian`` dataset (float64, exact encoder)."""
    from vaes.linear_gaussian import LinearGaussian, LinearGaussianConfig

    d, q = LINEAR_GAUSSIAN_DIMS
    model = LinearGaussian(LinearGaussianConfig(data_dim=d, latent_dim=q, encoder="exact")).double()
    gen = torch.Generator().manual_seed(LINEAR_GAUSSIAN_MODEL_SEED)
    with torch.no_grad():
        # Factor loadings of unit scale and noise sigma = 0.5: the latent signal dominates but noise is visible.
        model.weight.copy_(torch.randn(d, q, dtype=torch.float64, generator=gen))
        model.mu.copy_(0.5 * torch.randn(d, dtype=torch.float64, generator=gen))
        model.log_sigma.fill_(float(np.log(0.5)))
    return model.eval().requires_grad_(False)


def _float64_density(log_prob: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """Wrap a CPU float64 density so it takes x on any device and dtype and returns [B] float64 on x's device."""

    def exact_log_density(x: Tensor) -> Tensor:
        with torch.no_grad():
            return log_prob(x.detach().to("cpu", torch.float64)).to(x.device)

    return exact_log_density


def _synthetic(name: str, seed: int, sample: Callable[[int, torch.Generator], Tensor],
               log_prob: Callable[[Tensor], Tensor]) -> Dataset:
    gen = _torch_generator(seed, name)
    train, valid, test = (sample(n, gen).float() for n in SYNTHETIC_SIZES)
    return Dataset(name, train, valid, test, kind="real", image_shape=None,
                   exact_log_density=_float64_density(log_prob))


@register_dataset("linear-gaussian",
                  description="synthetic probabilistic PCA, d=20, q=5, sigma=0.5 (2000/500/500); exact log p(x)")
def _load_linear_gaussian(seed: int, data_dir: Path | None) -> Dataset:
    model = true_linear_gaussian()
    return _synthetic("linear-gaussian", seed, model.sample, model.exact_log_marginal)


@register_dataset("gaussian-toy",
                  description="Rainforth et al.'s Gaussian toy, x ~ N(mu, 2 I) in 20-D (2000/500/500); exact log p(x)")
def _load_gaussian_toy(seed: int, data_dir: Path | None) -> Dataset:
    from vaes.gaussian_toy import true_prior_mean

    mu = true_prior_mean(20)  # p(x) = N(mu, 2 I): z ~ N(mu, I), x | z ~ N(z, I)
    sample = lambda n, gen: mu + np.sqrt(2) * torch.randn(n, mu.shape[0], dtype=torch.float64, generator=gen)
    log_prob = lambda x: (-0.5 * ((x - mu).pow(2) / 2 + np.log(4 * np.pi)).sum(-1))
    return _synthetic("gaussian-toy", seed, sample, log_prob)


def _mixture_loader(name: str, preset: str) -> Loader:
    def load(seed: int, data_dir: Path | None) -> Dataset:
        from vaes.mixture import get_mixture

        mixture = get_mixture(preset)
        return _synthetic(name, seed, mixture.sample, mixture.log_prob)

    return load


register_dataset("mixture-2d",
                 description="synthetic 8-component ring of Gaussians in 2-D (2000/500/500); exact log p(x)")(
    _mixture_loader("mixture-2d", "ring-2d"))
register_dataset("mixture-16d",
                 description="synthetic 5-component Gaussian mixture in 16-D (2000/500/500); exact log p(x)")(
    _mixture_loader("mixture-16d", "random-16d"))


# --- binarized MNIST -------------------------------------------------------------------------------

MNIST_FILE = "binarized_mnist.npz"
MNIST_PIXELS = 784
MNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/binarized_mnist_{split}.amat"
# sha256 of each unpacked uint8 [N, 784] array's bytes (the published fixed binarization, 50k / 10k / 10k).
MNIST_SHA256 = {
    "train": "43490d4d6ac9002727af4426d8748609fdb7e4094fa65ad8d681ea60082a7a5a",
    "valid": "069b4f0beb389b776478c3e872b4df71c95ac4be64d7cbe6d32e24ebac8e6d5e",
    "test": "ca0294c3b8d984c7a1dc891015a8eea6f37bae59a34e35ea0fc8c47110a8dd86",
}
# Files already verified in this process, keyed by (path, size, mtime): hashing 55M pixels once is enough.
_verified_files: set[tuple[str, int, int]] = set()


def cache_dir() -> Path:
    """The user cache for downloaded data: $XDG_CACHE_HOME/elbo-bench, else ~/.cache/elbo-bench."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "elbo-bench"


def mnist_candidates(data_dir: Path | None) -> list[Path]:
    """Where binarized_mnist.npz is looked for, in order (relative paths are relative to the current directory)."""
    dirs = [data_dir, os.environ.get(DATA_ENV) or None, cache_dir()]
    return [Path(d) / MNIST_FILE for d in dirs if d is not None]


def fetch(url: str, destination: Path) -> None:
    """Download ``url`` to ``destination`` (tests replace this function to stay offline)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(destination, "wb") as out:
        while chunk := response.read(1 << 20):
            out.write(chunk)


def parse_amat(text: bytes) -> np.ndarray:
    """One image a line, 784 space-separated 0/1 values -> uint8 [N, 784]."""
    rows = sum(1 for line in text.splitlines() if line.strip())
    digits = np.frombuffer(text.translate(None, b" \t\r\n"), dtype=np.uint8) - ord("0")
    if digits.size != rows * MNIST_PIXELS or digits.max(initial=0) > 1:
        raise DataIntegrityError(f"not a binarized MNIST .amat file: expected {MNIST_PIXELS} 0/1 values on each of "
                                 f"{rows} lines")
    return digits.reshape(rows, MNIST_PIXELS)


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.uint8).tobytes()).hexdigest()


def _check_digests(arrays: dict[str, np.ndarray], source: Path | str) -> None:
    for split in SPLITS:
        got = _sha256(arrays[split])
        if got != MNIST_SHA256[split]:
            raise DataIntegrityError(f"binarized MNIST {split} split from {source} has sha256 {got}, expected "
                                     f"{MNIST_SHA256[split]}; delete the file and download it again")


def download_mnist(destination: Path) -> Path:
    """Fetch the three .amat files, check their digests, and write the packed .npz atomically to ``destination``."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    with tempfile.TemporaryDirectory(dir=destination.parent) as tmp:
        for split in SPLITS:
            amat = Path(tmp) / f"binarized_mnist_{split}.amat"
            fetch(MNIST_URL.format(split=split), amat)
            arrays[split] = parse_amat(amat.read_bytes())
        _check_digests(arrays, MNIST_URL.format(split="{train,valid,test}"))
        packed = Path(tmp) / MNIST_FILE
        np.savez(packed, **{split: np.packbits(arrays[split], axis=1) for split in SPLITS})
        os.replace(packed, destination)
    return destination


def _not_found(candidates: list[Path], reason: Exception) -> DataNotFoundError:
    return DataNotFoundError(
        f"binarized MNIST not found (looked for {', '.join(map(str, candidates))}) and the download failed "
        f"({reason}); put {MNIST_FILE} in a folder and set {DATA_ENV}=that folder (or pass --data-dir)")


MNIST_PACKED_WIDTH = (MNIST_PIXELS + 7) // 8  # bytes of one image packed a bit a pixel


def _read_packed(path: Path) -> dict[str, np.ndarray]:
    """The packed splits of an .npz archive, or DataIntegrityError naming the file and the problem.

    Any damage (a bad zip member or CRC, a truncated file, arrays holding Python objects, which
    allow_pickle=False refuses, or of another dtype or shape) is one error, before the digests are checked."""
    try:
        with np.load(path, allow_pickle=False) as packed:
            missing = [s for s in SPLITS if s not in packed.files]
            if missing:
                raise DataIntegrityError(f"{path} lacks the split(s) {', '.join(missing)}; "
                                         f"expected keys {', '.join(SPLITS)}")
            arrays = {s: packed[s] for s in SPLITS}
    except DataIntegrityError:
        raise
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as error:
        # numpy's refusal of pickled data advises loading it unsafely: not advice to pass on for a data file
        problem = ("it holds pickled Python objects, which are refused (loading them could run code)"
                   if "pickle" in str(error) else f"{type(error).__name__}: {_first_line(error)}")
        raise DataIntegrityError(f"{path} is not a readable data archive ({problem}); delete it and download it "
                                 "again") from None
    for split, array in arrays.items():
        if array.dtype != np.uint8 or array.ndim != 2 or array.shape[1] != MNIST_PACKED_WIDTH:
            raise DataIntegrityError(f"{path}: split {split} is {array.dtype} {list(array.shape)}, expected uint8 "
                                     f"[N, {MNIST_PACKED_WIDTH}] (bit-packed images); delete it and download it again")
    return arrays


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no detail"


def _read_mnist(path: Path) -> dict[str, np.ndarray]:
    arrays = {s: np.unpackbits(a, axis=1)[:, :MNIST_PIXELS] for s, a in _read_packed(path).items()}
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _verified_files:
        _check_digests(arrays, path)
        _verified_files.add(key)
    return arrays


@register_dataset("binarized-mnist",
                  description="MNIST, the fixed binarization (50000/10000/10000, 28x28); from $ELBO_BENCH_DATA or "
                              "downloaded once")
def _load_binarized_mnist(seed: int, data_dir: Path | None) -> Dataset:
    candidates = mnist_candidates(data_dir)
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        try:
            path = download_mnist(candidates[-1])
        except (OSError, urllib.error.URLError) as error:  # offline, DNS failure, HTTP error, unwritable cache
            raise _not_found(candidates, error) from None
    arrays = _read_mnist(path)
    train, valid, test = (torch.from_numpy(arrays[s].astype(np.float32)) for s in SPLITS)
    return Dataset("binarized-mnist", train, valid, test, kind="binary", image_shape=(28, 28))
