"""Counter-based randomness: every random number is a pure function of (seed, epoch, index, stream).

Why our own generator: torch's generators are stateful, so the numbers a sample gets depend on
how many were drawn before it (batch size, worker count, world size). A counter-based hash gives
each sample its own numbers, identical on any batching, on CPU and CUDA, with no per-sample
Python. The hash works on int64 tensors holding 32-bit values; multipliers are below 2**31 so
no product overflows int64 and results are bit-identical on every device.
"""

from __future__ import annotations

import functools
import hashlib
import math

import torch

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def derive_seed(*parts: object) -> int:
    """A 63-bit integer seed from any printable parts (stable across runs and machines)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _stream_key(seed: int, stream: str) -> int:
    """A 64-bit key for (seed, stream): FNV-1a over the stream's bytes, then a splitmix64
    finaliser with the seed. Pure Python integer arithmetic, so torch.compile folds it into a
    constant (a library hash such as hashlib would break the graph). Stream names are ASCII."""
    h = 0xCBF29CE484222325
    for ch in stream:  # ASCII: ord(ch) is the byte; torch 2.10-2.12 cannot trace bytes.__iter__
        h = ((h ^ ord(ch)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    h = (h ^ (seed * 0x9E3779B97F4A7C15)) & 0xFFFFFFFFFFFFFFFF
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return h ^ (h >> 31)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (two xorshift-multiply rounds) on int64 tensors."""
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


class CounterRNG:
    """Random numbers keyed by ``(seed, epoch, index, stream)``; ``stream`` names the purpose.

    A stream is a name such as ``"crop"``: adding a new stream never changes the numbers an
    existing stream gives, so adding an augmentation does not reshuffle the others.
    """

    def __init__(self, seed: int):
        self.seed = int(seed)

    def _keys(self, epoch: int | torch.Tensor, stream: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Two 32-bit keys for (seed, epoch, stream), as 0-d tensors.

        The (seed, stream) part is a Python constant; the epoch enters through tensor integer
        ops, so an epoch given as a tensor makes the keys graph inputs rather than constants
        (a compiled view function is then not recompiled every epoch).
        """
        base = _stream_key(self.seed, stream)
        if not isinstance(epoch, torch.Tensor):
            epoch = torch.full((), int(epoch), dtype=torch.int64, device=device)
        e = epoch.to(device=device, dtype=torch.int64) & _M32
        k1 = _mix32(((e * 0x61C88647) & _M32) ^ (base & _M32))
        k2 = _mix32(k1 ^ ((base >> 32) & _M32))
        return k1, k2

    def bits(self, epoch: int | torch.Tensor, index: torch.Tensor, stream: str, n: int) -> torch.Tensor:
        """``[len(index), n]`` int64 tensor of 32-bit random integers."""
        k1, k2 = self._keys(epoch, stream, index.device)
        idx = index.to(torch.int64).reshape(-1, 1) & _M32
        counter = torch.arange(n, device=index.device, dtype=torch.int64).reshape(1, -1)
        state = _mix32(idx ^ k1)
        return _mix32(_mix32(((state + counter * _GOLDEN) & _M32) ^ k2))

    def uniform(self, epoch: int | torch.Tensor, index: torch.Tensor, stream: str, n: int = 1) -> torch.Tensor:
        """``[len(index), n]`` float32 uniforms in [0, 1) with 24 random bits (exact in fp32)."""
        return (self.bits(epoch, index, stream, n) >> 8).to(torch.float32) * (1.0 / (1 << 24))

    def normal(self, epoch: int | torch.Tensor, index: torch.Tensor, stream: str, n: int = 1) -> torch.Tensor:
        """``[len(index), n]`` standard normals (Box-Muller)."""
        u = self.uniform(epoch, index, stream, 2 * n)
        u1 = 1.0 - u[:, :n]  # (0, 1]: log is finite
        return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u[:, n:])

    def beta(self, epoch: int | torch.Tensor, index: torch.Tensor, stream: str, alpha: float) -> torch.Tensor:
        """``[len(index)]`` symmetric Beta(alpha, alpha) samples by inverse CDF (one uniform each:
        a handful of operations instead of rejection-sampled Gammas). In float32, values within
        6e-8 of 1 are 1.0 (Beta(0.1, 0.1) has 9% of its mass there): for a mixing weight the
        same thing."""
        u = self.uniform(epoch, index, stream, 1)[:, 0]
        if alpha == 1.0:
            return u  # Beta(1, 1) is uniform
        xs, cdf = beta_cdf_table(alpha, index.device)
        i = torch.searchsorted(cdf, u.contiguous()).clamp(1, len(cdf) - 1)
        c0, c1 = cdf[i - 1], cdf[i]
        w = ((u - c0) / (c1 - c0).clamp_min(1e-12)).clamp(0, 1)
        return xs[i - 1] + w * (xs[i] - xs[i - 1])

    def permutation(self, epoch: int, n: int, stream: str) -> torch.Tensor:
        """A permutation of ``range(n)`` keyed by (seed, epoch, stream), on the CPU.

        Sorting 62-bit hash keys (rather than ``torch.randperm``) keeps the permutation
        independent of the torch version, so stored targets of mixed views stay valid.
        """
        b = self.bits(epoch, torch.arange(n), stream, 2)
        keys = (b[:, 0] << 30) | (b[:, 1] >> 2)
        return torch.sort(keys, stable=True).indices


@functools.lru_cache(maxsize=16)
def beta_cdf_table(alpha: float, device: torch.device, points: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid ``x`` and CDF of Beta(alpha, alpha) (float32 on ``device``).

    On ``[0, 1/2]`` the CDF is integrated in float64 in the variable ``v = x^alpha``, where
    ``x^(alpha-1) (1-x)^(alpha-1) dx = (1/alpha) (1-x)^(alpha-1) dv`` has no singularity at 0
    (the density diverges there for alpha < 1); the other half follows by symmetry,
    ``F(1 - x) = 1 - F(x)``.
    """
    v = torch.linspace(0.0, 0.5**alpha, points, dtype=torch.float64)
    x = v ** (1.0 / alpha)
    x_mid = ((v[1:] + v[:-1]) / 2.0) ** (1.0 / alpha)
    increments = (v[1:] - v[:-1]) * (1.0 - x_mid) ** (alpha - 1.0) / alpha
    left = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(increments, 0)])
    left = 0.5 * left / left[-1]
    xs = torch.cat([x, 1.0 - x.flip(0)[1:]])
    cdf = torch.cat([left, 1.0 - left.flip(0)[1:]])
    return xs.to(device=device, dtype=torch.float32), cdf.to(device=device, dtype=torch.float32)
