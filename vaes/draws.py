"""The noise of an estimate's draws, the same however the draws are grouped into chunks.

One seed is taken from torch's global generator when an estimate starts drawing, so
``torch.manual_seed`` fixes everything that follows. Draw j (counted over the whole
estimate) then takes all its noise, layer after layer or step after step, from its own
generator seeded with a mix of that seed and j. A chunk of draws j .. j + k - 1 gets
the same numbers whether it is one chunk of K or K chunks of one: torch fills a tensor
from a generator in a pattern that depends on the tensor's size, and here each draw's
tensors have the same size in every chunk.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

_MASK64 = 2**64 - 1


def fresh_seed() -> int:
    """A seed for one estimate's draws, taken from torch's global (CPU) generator."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def draw_seed(seed: int, draw: int) -> int:
    """The seed of draw ``draw``'s generator: splitmix64 of the estimate's seed stepped ``draw + 1`` times,
    so neighbouring draws get unrelated seeds."""
    z = (seed + (draw + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@dataclass
class DrawNoise:
    """Standard normal noise for draws ``first`` .. ``first + count - 1`` of one estimate.

    Each call hands every draw the next numbers of its own stream, so a model asks for
    its noise in the order it uses it (layer by layer, step by step) and gets, for each
    draw, the same numbers in any chunk.
    """

    seed: int
    first: int  # index of this chunk's first draw in the estimate
    count: int  # draws in this chunk
    device: torch.device

    @cached_property
    def generators(self) -> list[torch.Generator]:
        """One generator per draw, made when the chunk first asks for noise."""
        return [torch.Generator(self.device).manual_seed(draw_seed(self.seed, self.first + i))
                for i in range(self.count)]

    def fill_(self, out: Tensor, start: int = 0) -> Tensor:
        """Fill out[i] with the next N(0, 1) numbers of draw ``start + i`` of this chunk, for every i; in place."""
        for row, generator in zip(out, self.generators[start:start + out.shape[0]], strict=True):
            row.normal_(generator=generator)
        return out

    def normal(self, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        """The next N(0, 1) numbers of every draw, [count, *shape]."""
        return self.fill_(torch.empty((self.count, *shape), dtype=dtype, device=self.device))


@dataclass
class GeneratorNoise:
    """Standard normal noise for ``count`` draws from one given generator (a caller that manages its own
    stream, e.g. AIS with ``generator=``); the same interface as ``DrawNoise``."""

    generator: torch.Generator | None  # None: torch's global generator
    count: int
    device: torch.device

    def normal(self, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        return torch.randn((self.count, *shape), dtype=dtype, device=self.device, generator=self.generator)


_vectorized = False  # inside ``vectorized_draws``: see there


@contextlib.contextmanager
def vectorized_draws() -> Iterator[None]:
    """Inside, a posterior's draws come straight from torch's global generator, with no per-draw seed.

    Under ``torch.func.vmap(..., randomness="different")`` every repetition then gets its own noise;
    the per-draw seeds of ``chunk_noise`` cannot be used there (a seed would have to be read out of a
    batched random number). Draws made this way do not equal ``log_weights``' under the same seed.
    """
    global _vectorized
    before, _vectorized = _vectorized, True
    try:
        yield
    finally:
        _vectorized = before


def draw_noise(k: int, device: torch.device, generator: torch.Generator | None = None) -> DrawNoise | GeneratorNoise:
    """Noise for one group of k draws: from ``generator`` when given (or the global generator inside
    ``vectorized_draws``), else the draws an estimate's single chunk of k would get (so a posterior's
    draws equal ``log_weights``' under the same global seed)."""
    if generator is not None or _vectorized:
        return GeneratorNoise(generator, k, torch.device(device))
    (noise,) = chunk_noise([k], device)
    return noise


def chunk_noise(sizes: Sequence[int], device: torch.device) -> Iterator[DrawNoise]:
    """``DrawNoise`` for successive chunks of ``sizes`` draws, all from one seed taken from torch's
    global generator when the first chunk is asked for."""
    seed, first = fresh_seed(), 0
    for count in sizes:
        yield DrawNoise(seed, first, count, torch.device(device))
        first += count
