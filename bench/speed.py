"""How fast ``estimators.iwae`` runs against a plain loop and the matmul ceiling.

    python -m bench.speed                       # K = 50 and 5000 on 1,000 examples
    python -m bench.speed --ks 50 --repeats 5   # quicker
    python -m bench.speed --test-set            # + wall time of IWAE-5000 on the MNIST test set
                                                # (read through bench.data: --data-dir, $ELBO_BENCH_DATA, cache)

Three ways to get the same number of importance samples (n_examples x K) through
the IWAE paper's one-layer model (create_model("vae"): 784-200-200-50, tanh, Bernoulli):
- ``iwae``: ``estimators.iwae`` as the suite runs it;
- ``loop``: a plain PyTorch loop over the K samples (encode, sample, decode,
  log-likelihood per sample; stack; logsumexp), the baseline;
- ``ceiling``: only the decoder's three matmuls (50->200->200->784) for the same
  number of samples, in cache-sized blocks with preallocated outputs: what this
  machine can do for this work at best.
Random initial weights and random binary data: speed does not depend on training.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from bench.data import DataIntegrityError, DataNotFoundError, load_dataset
from bench.run.timing import Timing, measure, peak_memory
from estimators import iwae
from vaes import create_model
from vaes.base import standard_normal_log_prob
from vaes.layers import reparameterize

CEILING_BLOCK_ROWS = 1024  # the fastest block on 2 CPU cores among 256..16384 rows


def plain_loop_iwae(model, x: torch.Tensor, k: int) -> torch.Tensor:
    """Baseline: one sample at a time, per-sample log w stacked, logsumexp at the end."""
    with torch.inference_mode():
        log_w = []
        for _ in range(k):
            mean, log_std = model.encode(x)
            z, log_q = reparameterize(mean, log_std, None)
            logits = model.decoder(z)
            log_lik = (x * logits).sum(-1) - torch.nn.functional.softplus(logits).sum(-1)
            log_w.append(log_lik + standard_normal_log_prob(z) - log_q)
        return torch.logsumexp(torch.stack(log_w), 0) - math.log(k)


def matmul_ceiling(model, n_samples: int) -> Callable[[], None]:
    """The decoder's matmuls alone for ``n_samples`` rows (no bias, no activation)."""
    weights = [m.weight.detach().t().contiguous() for m in model.decoder if isinstance(m, torch.nn.Linear)]
    block = min(CEILING_BLOCK_ROWS, n_samples)
    inputs = torch.randn(block, weights[0].shape[0])
    outputs = [torch.empty(block, w.shape[1]) for w in weights]

    def run() -> None:
        for start in range(0, n_samples, block):
            n = min(block, n_samples - start)
            h = inputs[:n]
            for w, out in zip(weights, outputs):
                h = torch.mm(h, w, out=out[:n])

    return run


def random_binary(n: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, dim, generator=generator) < 0.3).float()


def compare(k: int, n_examples: int, *, repeats: int, warmup: int) -> dict[str, Timing]:
    model = create_model("vae").eval()
    x = random_binary(n_examples, model.config.data_dim, seed=k)
    methods = {
        "iwae": lambda: iwae(model, x, k=k),
        "loop": lambda: plain_loop_iwae(model, x, k),
        "ceiling": matmul_ceiling(model, n_examples * k),
    }
    # Rounds interleave the methods so that load from other processes hits all of them alike.
    for fn in methods.values():
        for _ in range(warmup):
            fn()
    rounds = [{name: measure(fn, device="cpu", n_examples=n_examples, k=k, warmup=0, repeats=1, memory=False)
               for name, fn in methods.items()} for _ in range(repeats)]
    # Memory last: its heap trim would make the next timed call fault its buffers in again.
    peaks = {name: peak_memory(fn, "cpu") for name, fn in methods.items()}
    return {name: _pooled([r[name] for r in rounds], *peaks[name]) for name in methods}


def _pooled(timings: list[Timing], peak_bytes: int, memory_measure: str) -> Timing:
    """One Timing from single-repeat rounds: median and IQR over all of them, and the peak memory."""
    times = tuple(t.median_s for t in timings)
    median = statistics.median(times)
    first = timings[0]
    iqr = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [0.0, 0.0, 0.0]
    return dataclasses.replace(
        first, median_s=median, iqr_s=iqr[2] - iqr[0], times_s=times,
        samples_per_s=first.n_examples * first.k / median, examples_per_s=first.n_examples / median,
        peak_memory_bytes=peak_bytes, memory_measure=memory_measure)


def load_mnist_test(data_dir: Path | None = None) -> torch.Tensor:
    """The binarized-MNIST test images, float32 [10000, 784], found and digest-checked by bench.data."""
    return load_dataset("binarized-mnist", data_dir=data_dir).test


def test_set_seconds(data_dir: Path | None, *, k: int, batch: int, batches: int | None) -> tuple[float, int, int]:
    """Seconds for IWAE-k over the first ``batches`` batches of the test set (all if None)."""
    model = create_model("vae").eval()
    test = load_mnist_test(data_dir)
    chunks = list(torch.split(test, batch))
    used = chunks if batches is None else chunks[:batches]
    timing = measure(lambda: [iwae(model, xb, k=k) for xb in used], device="cpu",
                     n_examples=sum(len(c) for c in used), k=k, warmup=0, repeats=1)
    return timing.median_s, timing.n_examples, len(test)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[50, 5000])
    parser.add_argument("--n-examples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats for K <= 500")
    parser.add_argument("--big-k-repeats", type=int, default=1, help="timed repeats (no warm-up) for K > 500")
    parser.add_argument("--big-k-examples", type=int, default=200,
                        help="examples for K > 500 (the plain loop at K = 5000 on 1,000 examples takes minutes)")
    parser.add_argument("--test-set", action="store_true", help="also time IWAE-5000 on the binarized-MNIST test set")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder holding binarized_mnist.npz (else $ELBO_BENCH_DATA, else the user cache)")
    parser.add_argument("--test-batches", type=int, default=None,
                        help="time only this many batches of 1,000 test images and extrapolate (default: all)")
    args = parser.parse_args(argv)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; samples/s = examples x K / median s")
    print(f"{'K':>6} {'n':>6} {'method':>8} {'samples/s':>12} {'median s':>9} {'IQR s':>7} {'peak MB':>8}"
          f"  {'vs loop':>7} {'of ceiling':>10}")
    peaks = {}
    for k in args.ks:
        big = k > 500
        timings = compare(k, args.big_k_examples if big else args.n_examples,
                          repeats=args.big_k_repeats if big else args.repeats, warmup=0 if big else 1)
        loop, ceiling = timings["loop"].samples_per_s, timings["ceiling"].samples_per_s
        for name, t in timings.items():
            print(f"{k:>6} {t.n_examples:>6} {name:>8} {t.samples_per_s:>12,.0f} {t.median_s:>9.3f} {t.iqr_s:>7.3f}"
                  f" {t.peak_memory_bytes / 2**20:>8.1f}  {t.samples_per_s / loop:>6.2f}x"
                  f" {t.samples_per_s / ceiling:>9.0%}")
        peaks[k] = timings["iwae"].peak_memory_bytes
    if len(peaks) > 1:
        low, high = min(peaks), max(peaks)
        print(f"iwae peak memory K={high} / K={low}: {peaks[high] / peaks[low]:.2f}"
              f"  ({timings['iwae'].memory_measure})")
    if args.test_set:
        try:
            seconds, done, total = test_set_seconds(args.data_dir, k=5000, batch=1000, batches=args.test_batches)
        except (DataNotFoundError, DataIntegrityError) as exc:
            parser.exit(2, f"bench.speed: error: {exc}\n")
        scaled = seconds * total / done
        note = "measured" if done == total else f"extrapolated from {done} measured images ({seconds:.1f} s)"
        print(f"IWAE-5000 on the {total:,} MNIST test images: {scaled:.1f} s wall ({note})")


if __name__ == "__main__":
    main()
