"""Reader for dlib's binary serialization (dlib/serialize.h, dlib/cuda/tensor.h), no dlib needed.

Why: dlib's face ResNet ships as a ``.dat`` file that only dlib can run, as a black box that cannot be
trained. Reading the format ourselves lets :mod:`pipeline.recognition.dlib_resnet` put the same weights into a
PyTorch network. The encodings, as dlib's code writes them (not as some of its comments say):

- integer: one control byte (low nibble = number of magnitude bytes, 0x80 = negative), then the
  magnitude little-endian;
- float / double: an integer mantissa then an integer exponent, value = mantissa * 2**exponent
  (exponents 32000 / 32001 / 32002 are +inf / -inf / NaN);
- bool: the character '1' or '0';
- string: an integer length, then the bytes;
- tensor: integer version 2, integers n, k, nr, nc, then n*k*nr*nc little-endian float32 (NCHW);
- alias tensor (a view into a layer's parameter tensor): version 1, then n, k, nr, nc.
"""
from __future__ import annotations

import math

import numpy as np

FLOAT_INF, FLOAT_NINF, FLOAT_NAN = 32000, 32001, 32002


class DlibFormatError(ValueError):
    """The bytes are not what dlib's serialization of the expected object would be."""


class DlibReader:
    """Sequential reader over the bytes of one serialized dlib object."""

    def __init__(self, data: bytes, name: str = "<bytes>"):
        self.data = memoryview(data)
        self.pos = 0
        self.name = name
        self.context = ""  # what is being read (set by the caller), named in every error

    def fail(self, what: str) -> DlibFormatError:
        where = f"{self.context}: " if self.context else ""
        return DlibFormatError(f"{self.name}: {where}{what} (at byte {self.pos})")

    def _take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"truncated: {n} bytes wanted, {len(self.data) - self.pos} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        control = self._take(1)[0]
        size = control & 0x0F
        if control & 0x70 or size > 8:
            raise self.fail(f"bad integer control byte 0x{control:02x}")
        value = int.from_bytes(self._take(size), "little")
        return -value if control & 0x80 else value

    def float(self) -> float:
        mantissa, exponent = self.int(), self.int()
        if exponent == FLOAT_INF:
            return math.inf
        if exponent == FLOAT_NINF:
            return -math.inf
        if exponent == FLOAT_NAN:
            return math.nan
        return math.ldexp(mantissa, exponent)

    def bool(self) -> bool:
        c = bytes(self._take(1))
        if c not in (b"0", b"1"):
            raise self.fail(f"bad bool byte {c!r}")
        return c == b"1"

    def str(self) -> str:
        n = self.int()
        if not 0 <= n <= 1 << 20:
            raise self.fail(f"implausible string length {n}")
        return bytes(self._take(n)).decode("latin-1")

    def version(self, allowed: tuple[int, ...], what: str) -> int:
        v = self.int()
        if v not in allowed:
            raise self.fail(f"{what}: version {v}, expected one of {allowed}")
        return v

    def shape(self) -> tuple[int, int, int, int]:
        dims = tuple(self.int() for _ in range(4))
        if any(d < 0 for d in dims):
            raise self.fail(f"negative tensor dimension {dims}")
        return dims  # type: ignore[return-value]

    def tensor(self) -> np.ndarray:
        """A resizable_tensor: n x k x nr x nc float32."""
        self.version((2,), "tensor")
        shape = self.shape()
        count = int(np.prod(shape))
        raw = self._take(4 * count)
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)

    def alias(self) -> tuple[int, int, int, int]:
        """An alias_tensor: only the shape of a view into the layer's params."""
        self.version((1,), "alias tensor")
        return self.shape()

    def expect_str(self, allowed: tuple[str, ...], what: str) -> str:
        s = self.str()
        if s not in allowed:
            raise self.fail(f"{what}: found {s!r}, expected one of {allowed}")
        return s

    def at_end(self) -> bool:
        return self.pos == len(self.data)
