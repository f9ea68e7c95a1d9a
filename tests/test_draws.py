"""The same seed gives the same draws, and so the same estimates, whatever the chunk or the memory budget.

Tolerances. With the same draws only rounding can differ: a matrix product of a few rows
may take another kernel than one of many, so float32 log weights of the same draw can
differ in their last bits (float64: ~1e-15 relative). Other draws would move every value
by its Monte Carlo error, which each test checks to be above 1e-2 nats, a hundred times the
1e-4 allowed; in float64 the allowance is 1e-9.
"""
from __future__ import annotations

import pytest
import torch

import estimators as E
import vaes
from estimators.chunking import BUDGET_ENV, choose_chunk
from vaes.base import LatentVariableModel, LogWeights
from vaes.draws import DrawNoise, chunk_noise, draw_seed


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrix products: two threads on a loaded machine made these tests 50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SAME_DRAWS_F32 = 1e-4  # nats: float32 rounding of the same draws (see the module docstring)
SAME_DRAWS_F64 = 1e-9
MC_ERROR_FLOOR = 1e-2  # nats: the smallest Monte Carlo error that other draws would show here


def _concat(noises: list[DrawNoise], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.cat([noise.normal(shape, torch.float32) for noise in noises])


def test_chunk_noise_is_the_same_for_any_grouping_of_the_draws():
    groupings = [[9], [3, 5, 1], [1] * 9, [2, 7]]
    streams = []
    for sizes in groupings:
        torch.manual_seed(4)
        noises = list(chunk_noise(sizes, "cpu"))
        # two successive requests, as a model with two layers makes them (sizes below and above 16)
        streams.append((_concat(noises, (3, 5)), _concat(noises, (33,))))
    for first, second in streams[1:]:
        assert torch.equal(first, streams[0][0]) and torch.equal(second, streams[0][1])
    # and the draws differ from one another: 9 * 15 standard normals, no two rows equal
    assert len({tuple(row.flatten().tolist()) for row in streams[0][0]}) == 9


def test_draw_seeds_are_distinct_across_draws_and_estimates():
    seeds = {draw_seed(seed, draw) for seed in (0, 1, 2**61) for draw in range(20000)}
    assert len(seeds) == 3 * 20000
    assert all(0 <= s < 2**64 for s in seeds)


class GlobalNoiseModel(LatentVariableModel):
    """A model with only log_weights, drawing from torch's global generator: the protocol's default chunks it."""

    layers = ("z",)

    def log_weights(self, x, k):
        z = torch.randn(k, *x.shape, dtype=x.dtype)
        log_q = -0.5 * z.pow(2).sum(-1)
        return LogWeights(-0.5 * (x - z).pow(2).sum(-1), {"z": -0.5 * (z / 2).pow(2).sum(-1)}, {"z": log_q})


_CHUNKED_MODELS = [
    ("vae", {"data_dim": 40, "latent_dim": 5, "hidden": (16,)}),
    ("vae", {"data_dim": 40, "latent_dim": 5, "hidden": (16,), "likelihood": "gaussian"}),
    ("hvae", {"data_dim": 40, "latent_dims": (5, 3), "hidden": ((16,), (8,))}),
    ("vdm", {"data_dim": 6, "steps": 3, "hidden": (8,)}),
    ("linear-gaussian", {}),
    ("global-noise", {}),
]


def _create(name: str, config: dict) -> LatentVariableModel:
    return GlobalNoiseModel() if name == "global-noise" else vaes.create_model(name, **config)


def _parts(log_weights: LogWeights) -> list[torch.Tensor]:
    return [log_weights.log_likelihood, *log_weights.log_prior.values(), *log_weights.log_posterior.values()]


@pytest.mark.parametrize("name, config", _CHUNKED_MODELS)
@pytest.mark.parametrize("autograd", [False, True], ids=["evaluation", "training"])
def test_log_weight_chunks_do_not_depend_on_the_chunk_sizes(name, config, autograd):
    model = _create(name, config).double()
    data_dim = getattr(model.config, "data_dim", 4)
    x = (torch.rand(6, data_dim, dtype=torch.float64) > 0.5).double()
    with torch.set_grad_enabled(autograd):
        torch.manual_seed(2)
        whole = model.log_weights(x, 9)  # one chunk of 9 (the first chunk of log_weight_chunks(x, [9]))
        torch.manual_seed(2)
        by_one = LogWeights.cat(list(model.log_weight_chunks(x, [1] * 9)))
        torch.manual_seed(2)
        chunks = list(model.log_weight_chunks(x, [3, 5, 1]))
    assert [c.log_likelihood.shape for c in chunks] == [(3, 6), (5, 6), (1, 6)]
    if name != "global-noise":  # that model's own log_weights is not chunked, so only its chunks agree
        for got, expected in zip(_parts(by_one), _parts(whole), strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=SAME_DRAWS_F64)
    for got, expected in zip(_parts(LogWeights.cat(chunks)), _parts(by_one), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=SAME_DRAWS_F64)
        assert got.requires_grad == (autograd and name != "global-noise")
    assert by_one.total().std(0).min() > MC_ERROR_FLOOR  # other draws would differ visibly


def test_the_default_chunks_leave_the_global_generator_as_one_seed_draw_would():
    model, x = GlobalNoiseModel(), torch.zeros(3, 4)
    torch.manual_seed(7)
    list(model.log_weight_chunks(x, [2, 3]))
    after = torch.rand(5)
    torch.manual_seed(7)
    torch.randint(0, 2**62, ())  # the one seed an estimate takes
    assert torch.equal(after, torch.rand(5))


# Per model, three budgets in MB that give three different chunks of a batch of BATCH (the VDM on 2-d data
# holds at least MIN_CHUNK_ELEMENTS numbers, 32 draws, whatever the budget below ~25 MB).
_BUDGET_MODELS = [
    ("vae", {"data_dim": 40, "latent_dim": 5, "hidden": (16,)}, 200, ("0.001", "2", "64")),
    ("hvae", {"data_dim": 40, "latent_dims": (5, 3), "hidden": ((16,), (8,))}, 200, ("0.001", "2", "64")),
    ("vdm", {"data_dim": 2, "steps": 2, "hidden": (8,), "likelihood": "gaussian"}, 100, ("0.001", "32", "64")),
]
BATCH = 512


def _estimates(model: LatentVariableModel, x: torch.Tensor, k: int, chunk: int | None) -> dict[str, torch.Tensor]:
    """Values and standard errors of ELBO, IWAE-K and Monte Carlo KL terms, each from seed 11."""
    out = {}
    for label, estimate in (("elbo", lambda: E.elbo(model, x, samples=k, chunk=chunk)),
                            ("iwae", lambda: E.iwae(model, x, k=k, chunk=chunk))):
        torch.manual_seed(11)
        est = estimate()
        out[label], out[f"{label}/stderr"] = est.value, est.stderr
    torch.manual_seed(11)
    for layer, est in E.kl_terms(model, x, samples=k, method="mc", chunk=chunk).items():
        out[f"kl/{layer}"], out[f"kl/{layer}/stderr"] = est.value, est.stderr
    return out


def _data(model: LatentVariableModel) -> torch.Tensor:
    torch.manual_seed(0)
    if model.config.likelihood == "gaussian":
        return torch.randn(BATCH, model.config.data_dim)
    return (torch.rand(BATCH, model.config.data_dim) > 0.5).float()


def _assert_same(results: list[dict[str, torch.Tensor]]) -> None:
    for result in results[1:]:
        assert result.keys() == results[0].keys()
        for key, value in result.items():
            torch.testing.assert_close(value, results[0][key], rtol=0, atol=SAME_DRAWS_F32, msg=key)
    assert float(results[0]["iwae/stderr"].median()) > MC_ERROR_FLOOR  # other draws would differ visibly


@pytest.mark.parametrize("name, config, k, budgets_mb", _BUDGET_MODELS)
def test_the_same_seed_gives_the_same_values_at_any_memory_budget(monkeypatch, name, config, k, budgets_mb):
    model = vaes.create_model(name, **config)
    x = _data(model)
    results, chunks = [], []
    for megabytes in budgets_mb:
        monkeypatch.setenv(BUDGET_ENV, megabytes)
        chunks.append(choose_chunk(model, x, k))
        results.append(_estimates(model, x, k, None))
    assert len(set(chunks)) == 3, chunks  # three different chunkings were compared
    _assert_same(results)


@pytest.mark.parametrize("name, config, k", [entry[:3] for entry in _BUDGET_MODELS])
def test_the_same_seed_gives_the_same_values_at_any_chunk(name, config, k):
    model = vaes.create_model(name, **config)
    x = _data(model)[:64]
    _assert_same([_estimates(model, x, k, chunk) for chunk in (1, 7, k)])
