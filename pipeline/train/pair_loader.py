"""Stream (raw, masked, label) training batches from WebDataset shards.

Why: reading a few large tar shards sequentially is what lets training scale past LFW; per-file
loaders spend their time in open()/stat(). Shards are split across DDP ranks and DataLoader
workers, samples pass through a seeded shuffle buffer, JPEGs decode with simplejpeg (libjpeg-turbo),
and ONE augmentation draw per pair is applied to both twins, so a pair differs only by the mask
(the seed drew them independently).

The augmentation draw is seeded by (seed, epoch, sample key), so it does not depend on the
number of workers or ranks.

What a pair costs: decoding its two 112 px JPEGs (~150-220 us on one core) and augmenting them
(~100-150 us) dominate. Around that the loader keeps its own work small, so that it runs at >= 90% of
the same decode + augmentation + batching on bytes already in memory (its ceiling, measured in the
same run by ``benchmarks/loader.py``):

- one tar pass per shard (:func:`pipeline.data.tar_chunks.read_chunk`), the next shard read into the
  page cache by a background thread meanwhile, so a cold shard's disk time overlaps the decoding;
- a plain seeded shuffle buffer (webdataset's algorithm, without its per-sample pipeline stages);
- batches built in the worker: each augmented twin is written straight into a uint8 batch array,
  converted to float once per batch (a 256-entry table, the same values as ``x / 127.5 - 1``),
  into shared memory when in a worker process (no copy on the way to the training process);
- DataLoader workers persist across epochs: :meth:`PairLoader.set_epoch` moves them to the next
  epoch through a shared counter, read when a worker starts its pass.
"""
from __future__ import annotations

import os
import random
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.align.geometry import STANDALONE_TWIN
from pipeline.config import AugmentParams
from pipeline.data.images import decode_rgb
from pipeline.recognition.models import pixels_to_input
from pipeline.seeding import seed_for
from pipeline.data.tar_chunks import read_chunk

# One sample: (key, raw JPEG bytes, masked JPEG bytes, label).
Sample = tuple[str, bytes, bytes, int]
# Where a worker's samples come from: its shard list -> samples in shard order. The default reads
# the tar files (:func:`shard_samples`); the loader benchmark passes bytes already in memory.
SampleSource = Callable[[list[str]], Iterable[Sample]]


# How standalone alignment moves a masked face's crop against the pair transform, measured on
# masked TRAIN photos (`python scripts/masked_geometry.py`: RetinaFace's five points, then at 512 px,
# dlib150 crops, 1,905 photos, 2026-12-04): mean and standard deviation of the crop centre's shift
# (dx, dy: shares of the side), its rotation (degrees) and log scale. Unmasked photos move a third
# to a half as much (std 0.012, 0.013, 2.2 deg, 0.038).
MASKED_GEOMETRY = {"mean": (-0.0054, 0.0104, -1.764, -0.0093), "std": (0.0203, 0.0250, 3.695, 0.0684)}


@dataclass(frozen=True)
class PairAugment:
    """One draw for a pair: flip, shift, scale and colour factors (both twins), and with
    ``masked_geometry: standalone`` a move of the masked twin alone."""

    flip: bool
    dx: float  # shift, in crop sides (the same draw on a 112 or a 150 crop)
    dy: float
    scale: float
    brightness: float
    contrast: float
    saturation: float
    masked: tuple[float, float, float, float] | None = None  # masked twin: (dx, dy, degrees, log scale)

    @staticmethod
    def draw(params: AugmentParams, rng: np.random.Generator) -> "PairAugment":
        j = params.color_jitter
        return PairAugment(
            flip=bool(params.flip and rng.random() < 0.5),
            dx=float(rng.uniform(-1, 1) * params.crop_jitter),
            dy=float(rng.uniform(-1, 1) * params.crop_jitter),
            scale=float(1.0 + rng.uniform(-1, 1) * params.scale_jitter),
            brightness=float(1.0 + rng.uniform(-j, j)),
            contrast=float(1.0 + rng.uniform(-j, j)),
            saturation=float(1.0 + rng.uniform(-j, j)),
            # drawn after the rest, so "pair" draws exactly what it drew before the option existed
            masked=tuple(float(rng.normal(m, s)) for m, s in zip(*MASKED_GEOMETRY.values()))
            if params.masked_geometry == "standalone" else None,
        )

    def matrix(self, size: int) -> np.ndarray:
        """Scale about the centre, then shift; a flip mirrors the result."""
        c = (size - 1) / 2.0
        m = np.array([[self.scale, 0.0, c - self.scale * c + self.dx * size],
                      [0.0, self.scale, c - self.scale * c + self.dy * size]])
        if self.flip:
            m = np.array([[-1.0, 0.0, size - 1.0], [0.0, 1.0, 0.0]]) @ np.vstack([m, [0, 0, 1]])
        return m

    def masked_matrix(self, size: int) -> np.ndarray:
        """The masked twin's own move (3 x 3): rotate and scale about the centre, then shift it."""
        dx, dy, degrees, log_scale = self.masked
        c = (size - 1) / 2.0
        m = cv2.getRotationMatrix2D((c, c), -degrees, float(np.exp(log_scale)))
        m[:, 2] += (dx * size, dy * size)
        return np.vstack([m, [0.0, 0.0, 1.0]])

    def apply(self, image: np.ndarray, pivot: float | None = None,
              dst: np.ndarray | None = None, before: np.ndarray | None = None) -> np.ndarray:
        """The geometric and colour change for one image (uint8 RGB). ``pivot`` is the grey level
        contrast turns about; :meth:`apply_pair` passes the raw twin's to both twins. ``dst`` (an
        array of the image's shape and dtype) receives the result when given. ``before``: a 3 x 3
        move applied first, in the same warp (the masked twin's own)."""
        h, w = image.shape[:2]
        colour = not self.brightness == self.contrast == self.saturation == 1.0
        out_dst = None if colour else dst  # with a colour change the geometry is an intermediate
        if before is not None:
            out = cv2.warpAffine(image, (np.vstack([self.matrix(w), [0, 0, 1]]) @ before)[:2], (w, h), dst=out_dst,
                                 flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        elif self.dx or self.dy or self.scale != 1.0:
            out = cv2.warpAffine(image, self.matrix(w), (w, h), dst=out_dst, flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_REFLECT_101)
        elif self.flip:
            out = cv2.flip(image, 1, dst=out_dst)
        elif out_dst is not None:
            out_dst[...] = image
            out = out_dst
        else:
            out = image
        if not colour:
            return out
        if pivot is None:
            pivot = mean_grey(out)
        # brightness b, contrast c about the pivot, saturation s about each pixel's grey, as one
        # saturating uint8 blend: s*b*c*x + (1-s)*b*c*grey(x) + (1-c)*b*pivot
        a = self.brightness * self.contrast
        grey = cv2.cvtColor(cv2.cvtColor(out, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        return cv2.addWeighted(out, self.saturation * a, grey, (1.0 - self.saturation) * a,
                               (1.0 - self.contrast) * self.brightness * pivot, dst=dst)

    def apply_pair(self, raw: np.ndarray, masked: np.ndarray, dst_raw: np.ndarray | None = None,
                   dst_masked: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Both twins with identical parameters, including the contrast pivot (from the raw); the
        masked twin moved first by its own draw when there is one."""
        pivot = mean_grey(raw)
        before = None if self.masked is None else self.masked_matrix(masked.shape[1])
        return self.apply(raw, pivot, dst_raw), self.apply(masked, pivot, dst_masked, before)


def mean_grey(image: np.ndarray) -> float:
    """Mean grey level of a uint8 RGB image: the exact integer sum over the pixel count (the same
    double as ``cvtColor(image, RGB2GRAY).mean()``, ~20x cheaper than numpy's mean)."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return cv2.sumElems(grey)[0] / grey.size


def decode_twins(key: str, raw_jpg: bytes, masked_jpg: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Both twins as HxWx3 uint8 RGB (the one decoder, :func:`pipeline.data.images.decode_rgb`)."""
    raw, masked = decode_rgb(raw_jpg), decode_rgb(masked_jpg)
    if raw is None or masked is None:
        raise ValueError(f"{key}: a twin is not a decodable image")
    if raw.shape != masked.shape:
        raise ValueError(f"{key}: raw {raw.shape} and masked {masked.shape} twins differ in size")
    return raw, masked


def augment_twins(key: str, raw: np.ndarray, masked: np.ndarray, augment: Optional[AugmentParams], seed: int,
                  epoch: int, dst: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One augmentation draw, seeded by (seed, epoch, key), applied to both twins (none when
    ``augment`` is None); written into ``dst`` (two arrays of the images' shape) when given."""
    if augment is not None:
        aug = PairAugment.draw(augment, np.random.default_rng(seed_for(seed, epoch, key)))
        out = aug.apply_pair(raw, masked, *(dst or (None, None)))
        if dst is not None:
            for o, d in zip(out, dst):
                if o is not d:  # OpenCV allocated rather than writing into d
                    d[...] = o
            return dst
        return out
    if dst is not None:
        dst[0][...], dst[1][...] = raw, masked
        return dst
    return raw, masked


# uint8 -> float32 in [-1, 1], the networks' input scale, as a table computed once.
_TO_UNIT = pixels_to_input(torch.arange(256, dtype=torch.uint8)).numpy()


def _empty_float(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float32 tensor; in a DataLoader worker process, in shared memory, so
    sending it to the training process copies nothing (what default_collate does for its stack).
    In the training process numpy's allocator (2-4x cheaper than torch.empty for a batch here)."""
    if get_worker_info() is None:
        return torch.from_numpy(np.empty(shape, np.float32))
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * 4)
    return torch.empty(0, dtype=torch.float32).set_(storage, 0, shape)


def to_batch(images: np.ndarray) -> torch.Tensor:
    """N x H x W x 3 uint8 RGB -> N x 3 x H x W float32 in [-1, 1] (the networks' input scale,
    :func:`pipeline.recognition.models.pixels_to_input`), one pass.
    The memory is channels_last (NHWC), the layout the training step uses."""
    n, h, w, c = images.shape
    out = _empty_float((n, h, w, c))
    if n:
        cv2.LUT(images.reshape(n * h, w, c), _TO_UNIT, dst=out.numpy().reshape(n * h, w, c))
    return out.permute(0, 3, 1, 2)


def shard_samples(urls: Sequence[str], masked_member: str = "masked.jpg") -> Iterator[Sample]:
    """The samples of these shards in file order, through the one tar reader
    (:func:`pipeline.data.tar_chunks.read_chunk`). Background threads read the first shard and, while one
    shard is parsed, the next into the page cache, so a cold shard's disk time overlaps decoding.
    ``masked_member``: the masked twin's member, ``masked.jpg`` where a sample has none of that name
    (``masked_standalone.jpg``: the twin aligned on its own, where a face was found)."""
    for i, url in enumerate(urls):
        if i == 0:
            prefetch(url)  # runs ahead of the parser: disk speed against decode speed
        if i + 1 < len(urls):
            prefetch(urls[i + 1])
        for key, members in read_chunk(url):
            try:
                yield key, members["raw.jpg"], members.get(masked_member) or members["masked.jpg"], int(members["cls"])
            except KeyError as err:
                raise KeyError(f"{url}: sample {key!r} lacks member {err}") from None


def prefetch(path: str) -> threading.Thread:
    """Read a file into the page cache in a daemon thread, so that it is there when it is parsed.
    One ``sendfile`` to /dev/null: no copy to user space and the GIL taken twice, not per block
    (a loop of reads in a thread slows the decoding thread down). posix_fadvise(WILLNEED) is not
    enough: Linux reads ahead at most ``read_ahead_kb`` of it."""
    thread = threading.Thread(target=_read_into_cache, args=(path,), name="shard-prefetch", daemon=True)
    thread.start()
    return thread


def _read_into_cache(path: str) -> None:
    try:
        with open(path, "rb", buffering=0) as fh, open(os.devnull, "wb", buffering=0) as null:
            try:
                offset = 0
                while (sent := os.sendfile(null.fileno(), fh.fileno(), offset, 1 << 30)) > 0:
                    offset += sent
                return
            except OSError:  # where sendfile wants a socket (macOS): large reads instead
                pass
            buf = bytearray(8 << 20)
            while fh.readinto(buf):
                pass
    except OSError:  # a hint only: the reader reports real errors
        pass


def shuffled(samples: Iterator, bufsize: int, initial: int, rng: random.Random) -> Iterator:
    """A shuffle buffer: webdataset's ``shuffle`` algorithm (same rng calls, same order) without
    its pipeline machinery. Fills two samples per step until ``bufsize``, yields from ``initial``."""
    initial = min(initial, bufsize)
    buf: list = []
    for sample in samples:
        buf.append(sample)
        if len(buf) < bufsize:
            nxt = next(samples, _END)
            if nxt is not _END:
                buf.append(nxt)
        if len(buf) >= initial:
            yield _pick(buf, rng)
    while buf:
        yield _pick(buf, rng)


_END = object()


def _pick(buf: list, rng: random.Random):
    k = rng.randint(0, len(buf) - 1)
    sample = buf[k]
    buf[k] = buf[-1]
    buf.pop()
    return sample


def current_rank() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class PairShards(IterableDataset):
    """Shard list -> rank split -> (shuffled) worker split -> samples -> batches.

    Yields whole batches (the DataLoader is built with ``batch_size=None``): per worker, with
    ``drop_last`` dropping that worker's last partial batch, as the DataLoader's own batching did.

    The rank split is fixed when the dataset is built (in the training process), not looked up
    inside DataLoader workers: a spawned or forkserver worker (macOS; Python 3.14's default on
    Linux) has no process group, and every rank would read every shard.

    The epoch lives in a shared-memory counter (:meth:`set_epoch`), read when a pass starts, so a
    persistent worker's pass for epoch e is the one a fresh loader for epoch e makes."""

    def __init__(self, shards: Sequence[str | Path], *, augment: Optional[AugmentParams], seed: int,
                 epoch: int, shuffle_buffer: int, batch_size: int, drop_last: bool,
                 rank: int | None = None, world: int | None = None, return_keys: bool = False,
                 source: SampleSource | None = None) -> None:
        super().__init__()
        self.urls = [str(s) for s in shards]
        if not self.urls:
            raise ValueError("make_pair_loader: no shards given")
        missing = [u for u in self.urls if not Path(u).is_file()]
        if missing:
            raise FileNotFoundError(f"shard(s) not found: {missing[:3]}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.augment, self.seed = augment, seed
        self._epoch = torch.full((1,), int(epoch), dtype=torch.int64).share_memory_()
        self.shuffle_buffer = shuffle_buffer
        self.batch_size, self.drop_last = batch_size, drop_last
        found_rank, found_world = current_rank()
        self.rank = found_rank if rank is None else rank
        self.world = found_world if world is None else world
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside world size {self.world}")
        self.return_keys = return_keys
        detected = augment is not None and augment.masked_geometry == "detected"
        self.source: SampleSource = source or (partial(shard_samples, masked_member=STANDALONE_TWIN) if detected
                                               else shard_samples)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next pass (persistent workers see it: the counter is shared)."""
        self._epoch.fill_(int(epoch))

    def worker_shards(self, epoch: int, worker: int, workers: int) -> list[str]:
        """This rank's and worker's shards for ``epoch``: with augmentation a new shard order
        every epoch, the same on every rank; then every world-th shard, then every workers-th."""
        urls = list(self.urls)
        if self.augment is not None:
            random.Random(seed_for(self.seed, epoch, "shards")).shuffle(urls)
        return urls[self.rank::self.world][worker::workers]

    def samples(self, epoch: int, worker: int, workers: int) -> Iterator[Sample]:
        """This worker's samples for ``epoch``, in the order they are batched."""
        samples = iter(self.source(self.worker_shards(epoch, worker, workers)))
        if self.augment is not None and self.shuffle_buffer > 1:
            rng = random.Random(seed_for(self.seed, epoch, f"buffer-{worker}"))
            samples = shuffled(samples, self.shuffle_buffer, 100, rng)
        return samples

    def __iter__(self) -> Iterator:
        epoch = self.epoch  # read now: the pass a persistent worker starts after set_epoch
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.batches(self.samples(epoch, wid, nw), epoch)

    def batches(self, samples: Iterable[Sample], epoch: int) -> Iterator:
        """(raw, masked, labels[, keys]) batches: each twin decoded and augmented straight into a
        uint8 batch array, converted to float once per batch."""
        size = self.batch_size
        raw = masked = None
        keys: list[str] = []
        labels: list[int] = []
        for key, raw_jpg, masked_jpg, label in samples:
            r, m = decode_twins(key, raw_jpg, masked_jpg)
            if raw is None:  # the batch arrays take the first pair's shape (default_collate's rule)
                raw, masked = np.empty((size, *r.shape), np.uint8), np.empty((size, *r.shape), np.uint8)
            elif r.shape != raw.shape[1:]:
                raise ValueError(f"{key}: image {r.shape} differs from the batch's {raw.shape[1:]}")
            n = len(keys)
            augment_twins(key, r, m, self.augment, self.seed, epoch, dst=(raw[n], masked[n]))
            keys.append(key)
            labels.append(label)
            if len(keys) == size:
                yield self._batch(raw, masked, labels, keys)
                keys, labels = [], []
        if keys and not self.drop_last:
            yield self._batch(raw, masked, labels, keys)

    def _batch(self, raw: np.ndarray, masked: np.ndarray, labels: list[int], keys: list[str]) -> tuple:
        n = len(keys)
        out = (to_batch(raw[:n]), to_batch(masked[:n]), torch.tensor(labels, dtype=torch.int64))
        return (*out, keys) if self.return_keys else out


class PairLoader(DataLoader):
    """The DataLoader of a :class:`PairShards`; :meth:`set_epoch` before each pass."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


def make_pair_loader(shards: list[str | Path], *, batch_size: int, augment: AugmentParams | None,
                     seed: int, epoch: int = 0, shuffle_buffer: int = 1000, num_workers: int = 0,
                     drop_last: bool = True, rank: int | None = None, world: int | None = None,
                     return_keys: bool = False, multiprocessing_context: str | None = None,
                     pin_memory: bool = False, source: SampleSource | None = None) -> PairLoader:
    """Batches (raw, masked, label[, keys]): float32 B x 3 x S x S RGB in [-1, 1] (S: the crops'
    side; channels_last memory), int64 B, and with ``return_keys`` the list of sample keys.

    ``augment`` None = evaluation: no augmentation, no shuffling, shards in the given order.
    Shards are split across DDP ranks (``rank``/``world``; default: the process group at build
    time), then across DataLoader workers (a worker with no shard yields nothing: see
    :func:`check_shard_count`). With ``drop_last`` each worker drops its own last partial batch.

    Build it once and call ``set_epoch(e)`` before each pass: workers (``num_workers`` > 0) persist
    across epochs, and pass e equals what ``make_pair_loader(..., epoch=e)`` gives. ``pin_memory``:
    when training on CUDA. ``source``: where a worker's samples come from (default: the tar shards;
    the benchmark passes bytes already in memory).
    """
    ds = PairShards(shards, augment=augment, seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer,
                    batch_size=batch_size, drop_last=drop_last, rank=rank, world=world,
                    return_keys=return_keys, source=source)
    return PairLoader(ds, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0,
                      multiprocessing_context=multiprocessing_context if num_workers > 0 else None)


def check_shard_count(n_shards: int, world: int, num_workers: int) -> None:
    """Every DataLoader worker of every rank needs a shard of its own: a rank with none would end
    its epoch at once and (ranks stop together) stop every rank with zero steps."""
    readers = world * max(1, num_workers)
    if n_shards < readers:
        raise ValueError(
            f"{n_shards} train shard(s) for {world} rank(s) x {max(1, num_workers)} loader worker(s) "
            f"= {readers} readers: every reader needs at least one shard. Cut the data into more "
            f"shards (lower pack.shard_max_count or pack.shard_max_bytes) or use fewer ranks or "
            f"train.num_workers.")
