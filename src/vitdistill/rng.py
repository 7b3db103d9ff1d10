"""Counter-based randomness: every random number is a pure function of (seed, epoch, index, stream).

Why our own generator: torch's generators are stateful, so the numbers a sample gets depend on
how many were drawn before it (batch size, worker count, world size). A counter-based hash gives
each sample its own numbers, identical on any batching, on CPU and CUDA, with no per-sample
Python. The hash works on int64 tensors holding 32-bit values; multipliers are below 2**31 so
no product overflows int64 and results are bit-identical on every device.
"""

from __future__ import annotations

import hashlib
import math

import torch

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def derive_seed(*parts: object) -> int:
    """A 63-bit integer seed from any printable parts (stable across runs and machines)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


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

    def _keys(self, epoch: int, stream: str) -> tuple[int, int]:
        key = derive_seed(self.seed, epoch, stream)
        return key & _M32, (key >> 32) & _M32

    def bits(self, epoch: int, index: torch.Tensor, stream: str, n: int) -> torch.Tensor:
        """``[len(index), n]`` int64 tensor of 32-bit random integers."""
        k1, k2 = self._keys(epoch, stream)
        idx = index.to(torch.int64).reshape(-1, 1) & _M32
        counter = torch.arange(n, device=index.device, dtype=torch.int64).reshape(1, -1)
        state = _mix32(idx ^ k1)
        return _mix32(_mix32(((state + counter * _GOLDEN) & _M32) ^ k2))

    def uniform(self, epoch: int, index: torch.Tensor, stream: str, n: int = 1) -> torch.Tensor:
        """``[len(index), n]`` float32 uniforms in [0, 1) with 24 random bits (exact in fp32)."""
        return (self.bits(epoch, index, stream, n) >> 8).to(torch.float32) * (1.0 / (1 << 24))

    def normal(self, epoch: int, index: torch.Tensor, stream: str, n: int = 1) -> torch.Tensor:
        """``[len(index), n]`` standard normals (Box-Muller)."""
        u = self.uniform(epoch, index, stream, 2 * n)
        u1 = 1.0 - u[:, :n]  # (0, 1]: log is finite
        return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u[:, n:])

    def gamma(self, epoch: int, index: torch.Tensor, stream: str, alpha: float, tries: int = 8) -> torch.Tensor:
        """``[len(index)]`` Gamma(alpha, 1) samples (Marsaglia-Tsang, vectorised rejection).

        Each sample has ``tries`` candidates; the first accepted one is used. Acceptance is
        over 95% per try, so all ``tries`` fail with probability below 1e-10 (then the mean).
        """
        boost = alpha < 1.0
        a = alpha + 1.0 if boost else alpha
        d = a - 1.0 / 3.0
        c = 1.0 / math.sqrt(9.0 * d)
        z = self.normal(epoch, index, stream + "/z", tries)
        u = self.uniform(epoch, index, stream + "/u", tries + 1)
        v = (1.0 + c * z) ** 3
        ok = (v > 0) & (torch.log(u[:, :tries].clamp_min(1e-30)) < 0.5 * z * z + d - d * v + d * torch.log(v.clamp_min(1e-30)))
        first = torch.argmax(ok.to(torch.int8), dim=1, keepdim=True)
        sample = torch.gather(d * v, 1, first).squeeze(1)
        sample = torch.where(ok.any(dim=1), sample, torch.full_like(sample, a))
        if boost:  # Gamma(alpha) = Gamma(alpha + 1) * U^(1/alpha)
            sample = sample * (1.0 - u[:, tries]).pow(1.0 / alpha)
        return sample

    def beta(self, epoch: int, index: torch.Tensor, stream: str, alpha: float) -> torch.Tensor:
        """``[len(index)]`` symmetric Beta(alpha, alpha) samples (ratio of two Gammas)."""
        x = self.gamma(epoch, index, stream + "/a", alpha)
        y = self.gamma(epoch, index, stream + "/b", alpha)
        return x / (x + y).clamp_min(1e-30)

    def permutation(self, epoch: int, n: int, stream: str) -> torch.Tensor:
        """A permutation of ``range(n)`` keyed by (seed, epoch, stream), on the CPU.

        Sorting 62-bit hash keys (rather than ``torch.randperm``) keeps the permutation
        independent of the torch version, so stored targets of mixed views stay valid.
        """
        b = self.bits(epoch, torch.arange(n), stream, 2)
        keys = (b[:, 0] << 30) | (b[:, 1] >> 2)
        return torch.sort(keys, stable=True).indices
