"""Datasets: shapes, binarization, deterministic disjoint splits, MNIST digests and download path, exact densities."""
from __future__ import annotations

import hashlib
import io
import math
import urllib.error

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp

from bench import data as data_module
from bench.data import (
    DATA_ENV,
    DataIntegrityError,
    DataNotFoundError,
    Dataset,
    UnknownDatasetError,
    dataset_descriptions,
    list_datasets,
    load_dataset,
    parse_amat,
    true_linear_gaussian,
)
from vaes.mixture import get_mixture

MNIST_PIXELS_SET = {"train": 5118041, "valid": 1028036, "test": 1038896}  # published with the digests


def _sorted_rows(array: np.ndarray) -> np.ndarray:
    return array[np.lexsort(array.T[::-1])]


# --- registry -------------------------------------------------------------------------------------

def test_registry_lists_every_dataset_with_a_one_line_description():
    assert list_datasets() == ["binarized-mnist", "digits", "gaussian-toy", "linear-gaussian", "mixture-16d",
                               "mixture-2d"]
    descriptions = dataset_descriptions()
    assert set(descriptions) == set(list_datasets())
    assert all(text and "\n" not in text for text in descriptions.values())


def test_unknown_dataset_and_split_name_the_choices():
    with pytest.raises(UnknownDatasetError, match=r"unknown dataset 'mnist'.*digits"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="unknown split 'validation'; choices: train, valid, test"):
        load_dataset("digits").split("validation")


# --- digits ---------------------------------------------------------------------------------------

def test_digits_shapes_binary_values_and_a_partition_of_all_images():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits", seed=0)
    assert [tuple(ds.split(s).shape) for s in ("train", "valid", "test")] == [(1297, 64), (250, 64), (250, 64)]
    assert ds.train.dtype == torch.float32
    assert (ds.kind, ds.likelihood, ds.image_shape) == ("binary", "bernoulli", (8, 8))
    assert ds.data_dim == 64 and ds.exact_log_density is None
    for split in ("train", "valid", "test"):
        values = torch.unique(ds.split(split))
        assert values.tolist() == [0.0, 1.0]
    # Disjoint and complete: the three splits together are exactly the 1797 binarized images, each once.
    together = torch.cat([ds.train, ds.valid, ds.test]).numpy()
    expected = (load_digits().data / 16.0 > 0.5).astype(np.float32)
    np.testing.assert_array_equal(_sorted_rows(together), _sorted_rows(expected))
    assert int(expected.sum()) == int(together.sum())


def test_digits_split_is_deterministic_in_the_seed():
    a, b, c = load_dataset("digits", seed=3), load_dataset("digits", seed=3), load_dataset("digits", seed=4)
    for split in ("train", "valid", "test"):
        assert torch.equal(a.split(split), b.split(split))
    assert not torch.equal(a.test, c.test)


# --- synthetic ------------------------------------------------------------------------------------

def test_linear_gaussian_exact_density_matches_scipy():
    ds = load_dataset("linear-gaussian", seed=0)
    model = true_linear_gaussian()
    w, mu, sigma = model.weight.numpy(), model.mu.numpy(), math.exp(model.log_sigma.item())
    cov = w @ w.T + sigma**2 * np.eye(20)
    x = ds.test[:200]
    expected = stats.multivariate_normal(mean=mu, cov=cov).logpdf(x.double().numpy())
    got = ds.exact_log_density(x)
    assert got.dtype == torch.float64 and got.shape == (200,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-8)


def test_linear_gaussian_data_come_from_the_true_model():
    """Mean log p(x) of the draws vs its expectation, minus the Gaussian entropy 0.5 log det(2 pi e C).

    For x ~ N(mu, C), -2 log p(x) - log det(2 pi C) ~ chi2_d, so Var[log p(x)] = d / 2 and the mean over
    n draws has standard error sqrt(d / (2 n)); the test allows 4 of those.
    """
    ds = load_dataset("linear-gaussian", seed=1)
    model = true_linear_gaussian()
    cov = model.marginal_covariance().numpy()
    d, n = cov.shape[0], ds.train.shape[0]
    entropy = 0.5 * np.linalg.slogdet(2 * np.pi * np.e * cov)[1]
    mean_log_p = ds.exact_log_density(ds.train).mean().item()
    assert abs(mean_log_p + entropy) < 4 * math.sqrt(d / (2 * n))


@pytest.mark.parametrize("name, preset", [("mixture-2d", "ring-2d"), ("mixture-16d", "random-16d")])
def test_mixture_exact_density_matches_scipy_and_sample_mean(name, preset):
    ds = load_dataset(name, seed=0)
    mixture = get_mixture(preset)
    weights, means, stds = (t.numpy() for t in (mixture.weights, mixture.means, mixture.stds))
    x = ds.test.double().numpy()
    per_component = stats.norm.logpdf(x[:, None, :], means, stds).sum(-1) + np.log(weights)  # [B, C]
    np.testing.assert_allclose(ds.exact_log_density(ds.test).numpy(), logsumexp(per_component, axis=1),
                               rtol=0, atol=1e-8)
    assert ds.train.shape == (2000, mixture.dim)
    assert (ds.kind, ds.likelihood, ds.image_shape) == ("real", "gaussian", None)
    # The draws follow the mixture: each coordinate's sample mean is within 4 standard errors
    # (sqrt(Var[x_j] / n), Var from the mixture's closed-form moments) of the mixture mean.
    mean = weights @ means
    var = weights @ (stds**2 + means**2) - mean**2
    sample_mean = ds.train.double().numpy().mean(0)
    assert np.all(np.abs(sample_mean - mean) < 4 * np.sqrt(var / ds.train.shape[0]))


@pytest.mark.parametrize("name", ["linear-gaussian", "mixture-2d", "mixture-16d"])
def test_synthetic_sets_are_deterministic_in_the_seed(name):
    a, b, c = load_dataset(name, seed=0), load_dataset(name, seed=0), load_dataset(name, seed=1)
    assert [tuple(a.split(s).shape[:1]) for s in ("train", "valid", "test")] == [(2000,), (500,), (500,)]
    for split in ("train", "valid", "test"):
        assert torch.equal(a.split(split), b.split(split))
        assert not torch.equal(a.split(split), c.split(split))
    assert not torch.equal(a.train[:500], a.valid)  # the splits are separate draws


# --- binarized MNIST: the real file ---------------------------------------------------------------

@pytest.mark.mnist
def test_mnist_shapes_and_published_digests(mnist_dir):
    ds = load_dataset("binarized-mnist", data_dir=mnist_dir)
    assert (ds.kind, ds.likelihood, ds.image_shape, ds.data_dim) == ("binary", "bernoulli", (28, 28), 784)
    for split, n in (("train", 50000), ("valid", 10000), ("test", 10000)):
        array = ds.split(split).numpy().astype(np.uint8)
        assert array.shape == (n, 784)
        assert hashlib.sha256(array.tobytes()).hexdigest() == data_module.MNIST_SHA256[split]
        assert int(array.sum()) == MNIST_PIXELS_SET[split]


@pytest.mark.mnist
def test_mnist_found_through_a_relative_environment_path(mnist_dir, monkeypatch, tmp_path):
    monkeypatch.chdir(mnist_dir.resolve().parent)
    monkeypatch.setenv(DATA_ENV, mnist_dir.resolve().name)  # relative to the current directory
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    ds = load_dataset("binarized-mnist")
    assert ds.test.shape == (10000, 784)


# --- binarized MNIST: fresh clone, download, integrity (offline, with a fake fetch) ----------------

def _offline(url, destination):
    raise urllib.error.URLError("no network in this test")


@pytest.fixture
def fresh_clone(monkeypatch, tmp_path):
    """No ELBO_BENCH_DATA, an empty user cache under tmp_path, and no network."""
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data_module, "fetch", _offline)
    return tmp_path


def test_fresh_clone_without_data_raises_one_clear_error(fresh_clone):
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("binarized-mnist")
    message = str(info.value)
    assert DATA_ENV in message and "binarized_mnist.npz" in message and "\n" not in message
    assert str(fresh_clone / "cache" / "elbo-bench" / "binarized_mnist.npz") in message
    assert not (fresh_clone / "cache" / "elbo-bench" / "binarized_mnist.npz").exists()


def _fake_amat(rng: np.random.Generator, rows: int) -> tuple[np.ndarray, bytes]:
    images = (rng.random((rows, 784)) < 0.2).astype(np.uint8)
    text = "".join(" ".join(map(str, row)) + "\n" for row in images).encode()
    return images, text


@pytest.fixture
def fake_server(fresh_clone, monkeypatch):
    """fetch serves small fake .amat files; MNIST_SHA256 is replaced by their digests."""
    rng = np.random.default_rng(0)
    images, texts = {}, {}
    for split, rows in (("train", 5), ("valid", 3), ("test", 2)):
        images[split], texts[split] = _fake_amat(rng, rows)
    calls = []

    def fetch(url, destination):
        calls.append(url)
        split = next(s for s in texts if url.endswith(f"binarized_mnist_{s}.amat"))
        destination.write_bytes(texts[split])

    monkeypatch.setattr(data_module, "fetch", fetch)
    monkeypatch.setattr(data_module, "MNIST_SHA256",
                        {s: hashlib.sha256(a.tobytes()).hexdigest() for s, a in images.items()})
    return images, calls


def test_download_once_converts_to_the_packed_form_and_reuses_the_cache(fake_server, fresh_clone):
    images, calls = fake_server
    ds = load_dataset("binarized-mnist")
    assert len(calls) == 3 and all(u.startswith("http://www.cs.toronto.edu/") for u in calls)
    for split in ("train", "valid", "test"):
        np.testing.assert_array_equal(ds.split(split).numpy(), images[split].astype(np.float32))
    cached = fresh_clone / "cache" / "elbo-bench" / "binarized_mnist.npz"
    with np.load(cached) as packed:
        assert packed["train"].shape == (5, 98) and packed["train"].dtype == np.uint8
        np.testing.assert_array_equal(np.unpackbits(packed["valid"], axis=1)[:, :784], images["valid"])
    assert [p.name for p in cached.parent.iterdir()] == ["binarized_mnist.npz"]  # no temporary files left
    again = load_dataset("binarized-mnist")
    assert len(calls) == 3 and torch.equal(again.test, ds.test)


def test_download_with_wrong_digest_is_refused_and_not_cached(fake_server, fresh_clone, monkeypatch):
    monkeypatch.setitem(data_module.MNIST_SHA256, "valid", "0" * 64)
    with pytest.raises(DataIntegrityError, match=r"valid split .* has sha256 .*, expected 0{64}"):
        load_dataset("binarized-mnist")
    assert list((fresh_clone / "cache" / "elbo-bench").iterdir()) == []


def test_local_file_with_wrong_contents_is_refused(fresh_clone):
    packed = {s: np.packbits(np.ones((2, 784), dtype=np.uint8), axis=1) for s in ("train", "valid", "test")}
    buffer = io.BytesIO()
    np.savez(buffer, **packed)
    folder = fresh_clone / "elsewhere"
    folder.mkdir()
    (folder / "binarized_mnist.npz").write_bytes(buffer.getvalue())
    with pytest.raises(DataIntegrityError, match=r"train split .* has sha256"):
        load_dataset("binarized-mnist", data_dir=folder)


def test_parse_amat_reads_rows_and_rejects_malformed_text():
    rng = np.random.default_rng(1)
    images, text = _fake_amat(rng, 4)
    np.testing.assert_array_equal(parse_amat(text), images)
    with pytest.raises(DataIntegrityError, match="784 0/1 values"):
        parse_amat(b"0 1 0\n1 1 0\n")
    with pytest.raises(DataIntegrityError, match="784 0/1 values"):
        parse_amat(text.replace(b"1", b"2", 1))


def test_dataset_rejects_mismatched_splits():
    with pytest.raises(ValueError, match="splits must be"):
        Dataset("bad", torch.zeros(3, 4), torch.zeros(2, 5), torch.zeros(2, 4), "real", None)
    with pytest.raises(ValueError, match="unknown data kind 'images'; choices: binary, real"):
        Dataset("bad", torch.zeros(3, 4), torch.zeros(2, 4), torch.zeros(2, 4), "images", None)
