"""Stream (raw, masked, label) training batches from WebDataset shards.

Why: reading a few large tar shards sequentially is what lets training scale past LFW; per-file
loaders spend their time in open()/stat(). Shards are split across DDP ranks and DataLoader
workers, samples pass through a seeded shuffle buffer, JPEGs decode with simplejpeg (libjpeg-turbo),
and ONE augmentation draw per pair is applied to both twins, so a pair differs only by the mask
(the seed drew them independently).

The augmentation draw is seeded by (seed, epoch, sample key), so it does not depend on the
number of workers or ranks.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import cv2
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import AugmentParams
from pipeline.images import decode_rgb
from pipeline.seeding import seed_for
from pipeline.tar_chunks import read_chunk

SIZE = 112


@dataclass(frozen=True)
class PairAugment:
    """One draw for a pair: flip, shift (pixels), scale and colour factors."""

    flip: bool
    dx: float
    dy: float
    scale: float
    brightness: float
    contrast: float
    saturation: float

    @staticmethod
    def draw(params: AugmentParams, rng: np.random.Generator) -> "PairAugment":
        j = params.color_jitter
        return PairAugment(
            flip=bool(params.flip and rng.random() < 0.5),
            dx=float(rng.uniform(-1, 1) * params.crop_jitter * SIZE),
            dy=float(rng.uniform(-1, 1) * params.crop_jitter * SIZE),
            scale=float(1.0 + rng.uniform(-1, 1) * params.scale_jitter),
            brightness=float(1.0 + rng.uniform(-j, j)),
            contrast=float(1.0 + rng.uniform(-j, j)),
            saturation=float(1.0 + rng.uniform(-j, j)),
        )

    def matrix(self, size: int) -> np.ndarray:
        """Scale about the centre, then shift; a flip mirrors the result."""
        c = (size - 1) / 2.0
        m = np.array([[self.scale, 0.0, c - self.scale * c + self.dx],
                      [0.0, self.scale, c - self.scale * c + self.dy]])
        if self.flip:
            m = np.array([[-1.0, 0.0, size - 1.0], [0.0, 1.0, 0.0]]) @ np.vstack([m, [0, 0, 1]])
        return m

    def apply(self, image: np.ndarray, pivot: float | None = None) -> np.ndarray:
        """The geometric and colour change for one image (uint8 RGB). ``pivot`` is the grey level
        contrast turns about; :meth:`apply_pair` passes the raw twin's to both twins."""
        h, w = image.shape[:2]
        if self.dx or self.dy or self.scale != 1.0:
            out = cv2.warpAffine(image, self.matrix(w), (w, h), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_REFLECT_101)
        elif self.flip:
            out = np.ascontiguousarray(image[:, ::-1])
        else:
            out = image
        if self.brightness == self.contrast == self.saturation == 1.0:
            return out
        if pivot is None:
            pivot = float(cv2.cvtColor(out, cv2.COLOR_RGB2GRAY).mean())
        # brightness b, contrast c about the pivot, saturation s about each pixel's grey, as one
        # saturating uint8 blend: s*b*c*x + (1-s)*b*c*grey(x) + (1-c)*b*pivot
        a = self.brightness * self.contrast
        grey = cv2.cvtColor(cv2.cvtColor(out, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        return cv2.addWeighted(out, self.saturation * a, grey, (1.0 - self.saturation) * a,
                               (1.0 - self.contrast) * self.brightness * pivot)

    def apply_pair(self, raw: np.ndarray, masked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Both twins with identical parameters, including the contrast pivot (from the raw)."""
        pivot = float(cv2.cvtColor(raw, cv2.COLOR_RGB2GRAY).mean())
        return self.apply(raw, pivot), self.apply(masked, pivot)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 RGB -> 3xHxW float32 in [-1, 1] ((x/255 - 0.5)/0.5)."""
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    return t.div_(127.5).sub_(1.0)


def make_pair(key: str, raw_jpg: bytes, masked_jpg: bytes, label: int,
              augment: Optional[AugmentParams], seed: int, epoch: int):
    """Decode both twins, apply one augmentation draw to both, return tensors and the label.

    Shared by the shard loader and the loose-file benchmark loader, so they differ only in I/O."""
    raw, masked = decode_rgb(raw_jpg), decode_rgb(masked_jpg)
    if raw.shape != masked.shape:
        raise ValueError(f"{key}: raw {raw.shape} and masked {masked.shape} twins differ in size")
    if augment is not None:
        aug = PairAugment.draw(augment, np.random.default_rng(seed_for(seed, epoch, key)))
        raw, masked = aug.apply_pair(raw, masked)
    return to_tensor(raw), to_tensor(masked), torch.tensor(label, dtype=torch.int64)


def tar_samples(src: Iterable[dict]) -> Iterator[dict]:
    """WebDataset pipeline stage: shard urls -> samples {"__key__", "__url__", ext: bytes}, through
    the project's one tar reader (:func:`pipeline.tar_chunks.read_chunk`), a lean drop-in for
    ``wds.tarfile_to_samples`` (whose tarfile parsing costs more than decoding)."""
    for item in src:
        url = item["url"]
        for key, members in read_chunk(url):
            yield {"__key__": key, "__url__": url, **members}


def current_rank() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class PairShards(IterableDataset):
    """WebDataset pipeline: shard list -> rank split -> (shuffled) worker split -> samples.

    The rank split is fixed when the dataset is built (in the training process), not looked up
    inside DataLoader workers: a spawned or forkserver worker (macOS; Python 3.14's default on
    Linux) has no process group, and every rank would read every shard."""

    def __init__(self, shards: Sequence[str | Path], *, augment: Optional[AugmentParams], seed: int,
                 epoch: int, shuffle_buffer: int, rank: int | None = None, world: int | None = None,
                 return_keys: bool = False) -> None:
        super().__init__()
        self.urls = [str(s) for s in shards]
        if not self.urls:
            raise ValueError("make_pair_loader: no shards given")
        missing = [u for u in self.urls if not Path(u).is_file()]
        if missing:
            raise FileNotFoundError(f"shard(s) not found: {missing[:3]}")
        self.augment, self.seed, self.epoch = augment, seed, epoch
        self.shuffle_buffer = shuffle_buffer
        found_rank, found_world = current_rank()
        self.rank = found_rank if rank is None else rank
        self.world = found_world if world is None else world
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside world size {self.world}")
        self.return_keys = return_keys

    def __iter__(self) -> Iterator:
        urls = list(self.urls)
        train = self.augment is not None
        if train:  # a new shard order every epoch, the same on every rank
            random.Random(seed_for(self.seed, self.epoch, "shards")).shuffle(urls)
        urls = urls[self.rank::self.world]
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        urls = urls[wid::nw]
        if not urls:
            return iter(())
        stages = [wds.SimpleShardList(urls), tar_samples]
        if train and self.shuffle_buffer > 1:
            rng = random.Random(seed_for(self.seed, self.epoch, f"buffer-{wid}"))
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=rng))
        pipe = wds.DataPipeline(*stages)
        for s in pipe:
            pair = make_pair(s["__key__"], s["raw.jpg"], s["masked.jpg"], int(s["cls"]), self.augment,
                             self.seed, self.epoch)
            yield (*pair, s["__key__"]) if self.return_keys else pair


def make_pair_loader(shards: list[str | Path], *, batch_size: int, augment: AugmentParams | None,
                     seed: int, epoch: int = 0, shuffle_buffer: int = 1000, num_workers: int = 0,
                     drop_last: bool = True, rank: int | None = None, world: int | None = None,
                     return_keys: bool = False, multiprocessing_context: str | None = None) -> DataLoader:
    """Batches (raw, masked, label[, keys]): float32 B x 3 x 112 x 112 RGB in [-1, 1], int64 B.

    ``augment`` None = evaluation: no augmentation, no shuffling, shards in the given order.
    Shards are split across DDP ranks (``rank``/``world``; default: the process group at build
    time), then across DataLoader workers (a worker with no shard yields nothing: see
    :func:`check_shard_count`). With ``drop_last`` each worker drops its own last partial batch.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    ds = PairShards(shards, augment=augment, seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer,
                    rank=rank, world=world, return_keys=return_keys)
    return DataLoader(ds, batch_size=batch_size, num_workers=num_workers, drop_last=drop_last,
                      persistent_workers=False, pin_memory=False,
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
