"""From sample indices to a batch of augmented, normalised views with their records.

The view of sample ``index`` in ``epoch`` is a pure function of ``(seed, epoch, index)``: the
same triple gives the same pixels on any batch size or process count. Besides the pixels, a
:class:`ViewBatch` records what later stages need to reason about the view (crop box in source
coordinates, flip, mixing partner, lambda and cutmix box).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch

from ..config import AugmentConfig
from ..data import ImageSource
from ..data.prefetch import prefetch
from ..rng import CounterRNG
from .geometry import centre_boxes, render, sample_boxes, sample_flips
from .mixing import MixPlan, apply_mixing, mixing_enabled, partner_table, plan_mixing, smooth_one_hot
from .photometric import color_jitter, random_erase
from .randaugment import fill_levels, parse_rand_augment, rand_augment


@dataclass
class ViewBatch:
    """Augmented views of a batch of samples and how each was made."""

    images: torch.Tensor  # [B, 3, S, S] float, normalised with the data mean/std
    labels: torch.Tensor  # [B] int64
    index: torch.Tensor  # [B] int64 stable sample ids
    epoch: int  # -1 for evaluation views
    boxes: torch.Tensor  # [B, 4] crop box (x1, y1, x2, y2) in source pixels
    flips: torch.Tensor  # [B] bool, horizontal flip applied after the crop
    partner: torch.Tensor  # [B] int64 mixing partner (== index when unmixed)
    partner_labels: torch.Tensor  # [B] int64
    partner_boxes: torch.Tensor  # [B, 4] the partner view's crop box (== boxes when unmixed)
    partner_flips: torch.Tensor  # [B] bool, the partner view's flip (== flips when unmixed)
    lam: torch.Tensor  # [B] own share of the image/label (1.0 when unmixed)
    mix_boxes: torch.Tensor  # [B, 4] cutmix region in output pixels (empty when none)
    view: torch.Tensor | None = None  # [B] view key, index + repeat * N: what the view's randomness is keyed by (default: index)
    partner_view: torch.Tensor | None = None  # [B] the partner view's key (default: partner)

    def __post_init__(self):
        if self.view is None:  # no repeated augmentation: a sample's one view per epoch
            self.view = self.index
        if self.partner_view is None:
            self.partner_view = self.partner

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device) -> ViewBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return ViewBatch(**{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})

    def label_targets(self, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
        """``[B, C]`` label distribution: ``lam * y_i + (1 - lam) * y_partner``, each smoothed."""
        own = smooth_one_hot(self.labels, num_classes, smoothing)
        other = smooth_one_hot(self.partner_labels, num_classes, smoothing)
        lam = self.lam.float()[:, None]
        return lam * own + (1.0 - lam) * other


class Augmenter:
    """Makes training and evaluation views of one split on ``device``.

    The decoded uint8 images live on the device when they fit (``placement``); otherwise in host
    memory, from where :meth:`train_batches` gathers each step's pixels ahead of time in
    ``workers`` threads. ``augment_device`` (the CPU) makes the views there and delivers them
    to ``device``. Views do not depend on any of these choices (bit for bit on the CPU).
    """

    def __init__(
        self,
        source: ImageSource,
        cfg: AugmentConfig,
        seed: int,
        mean,
        std,
        device: torch.device,
        placement: str = "auto",
        workers: int = 4,
        augment_device: torch.device | None = None,
    ):
        self.source = source
        self.cfg = cfg
        self.rng = CounterRNG(seed)
        self.output_device = device  # where batches are delivered (the model's device)
        device = augment_device or device  # where views are made (the CPU for the CPU path)
        self.device = device
        self.workers = workers
        self.images, self.on_device = place_images(source, device, placement)
        self.labels = source.labels.to(device)
        # variable-sized sources: each record's true (height, width, transposed), on the view device
        self.sizes = source.sizes.to(device) if source.sizes is not None else None
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self._partners: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self.rand_augment = parse_rand_augment(cfg.rand_augment) if cfg.rand_augment else None
        self.fill = fill_levels(tuple(float(m) for m in mean), device)  # timm fills uncovered pixels with the mean colour
        self.compiled_batch: int | None = None  # the one batch size compiled views are traced for
        if cfg.compile:
            # Eager views launch a few thousand small kernels per batch (RandAugment computes every
            # op for the whole batch; the counter hash is ~40 integer ops per call); compiled, they
            # fuse into few kernels. Compiled views equal eager ones up to float reassociation.
            # One static shape: smaller batches (an epoch's or a store's last) are padded to it.
            self._compiled_views = torch.compile(self._views, dynamic=False)

    @property
    def height(self) -> int:
        """The records' height (every image's, when ``sizes`` is None)."""
        return self.source.image_size[0]

    @property
    def width(self) -> int:
        return self.source.image_size[1]

    def geometry(self, index: torch.Tensor) -> tuple[torch.Tensor | int, torch.Tensor | int, torch.Tensor | None]:
        """Height, width and transposition of the images ``index`` (Python ints and None when
        every image fills its record: the fast path of same-sized data)."""
        if self.sizes is None:
            return self.height, self.width, None
        sizes = self.sizes[index]
        return sizes[:, 0], sizes[:, 1], sizes[:, 2].bool()

    def sample_index(self, keys: torch.Tensor) -> torch.Tensor:
        """The sample index of view keys (``index + repeat * N``)."""
        return keys % len(self.source) if self.cfg.repeats > 1 else keys

    def _gather(self, index: torch.Tensor) -> torch.Tensor:
        return self.images[index.to(self.images.device)].to(self.device, non_blocking=True)

    def _partners_for(self, epoch: int, on_device: bool = False) -> torch.Tensor:
        """This epoch's partner table (see :func:`partner_table`), on the CPU or the device."""
        if self._partners is None or self._partners[0] != epoch:
            table = partner_table(self.rng, epoch, len(self.source) * self.cfg.repeats)  # over view keys
            self._partners = (epoch, table, table.to(self.device))
        return self._partners[2] if on_device else self._partners[1]

    def pixels_needed(self, keys: torch.Tensor, epoch: int) -> torch.Tensor:
        """Source images a training batch of view keys reads: its own, then (with mixing) its
        partners', on the keys' own device (no host-device round trip)."""
        if not mixing_enabled(self.cfg):
            return self.sample_index(keys)
        partners = self._partners_for(epoch, on_device=keys.device.type != "cpu")[keys]
        return self.sample_index(torch.cat([keys, partners]))

    def to_device(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """An epoch's index batches on the view device in one copy (one per step would block
        the host once per step, losing the overlap of host and device)."""
        if self.device.type == "cpu" or not batches:
            return list(batches)
        return list(torch.cat(list(batches)).to(self.device).split([len(b) for b in batches]))

    def train_batches(self, batches: list[torch.Tensor], epoch: int) -> Iterator[ViewBatch]:
        """The training views of each index batch, in order (prefetching host-resident pixels)."""
        on_device = self.to_device(batches)
        if self.on_device:
            for index in on_device:
                yield self.train_batch(index, epoch)
            return
        needed = (self.pixels_needed(index.cpu(), epoch) for index in batches)
        for index, pixels in zip(on_device, prefetch(self.images, needed, self.device, self.workers)):
            yield self.train_batch(index, epoch, pixels)

    def _views(
        self, keys: torch.Tensor, epoch: torch.Tensor, pixels: torch.Tensor, height, width, transposed
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised views of ``keys`` (view keys) in ``epoch``, with their crop boxes (in each
        image's own pixels and orientation) and flips; ``height``, ``width``, ``transposed`` from
        :meth:`geometry`.

        Order (timm's): crop + resize, flip, RandAugment or colour jitter, normalise, erase.
        """
        cfg, rng = self.cfg, self.rng
        boxes = sample_boxes(rng, epoch, keys, height, width, cfg)
        flips = sample_flips(rng, epoch, keys, cfg.hflip)
        pad = cfg.pad if cfg.crop == "pad" else 0
        images = render(pixels, boxes, flips, cfg.input_size, pad, transposed)
        if self.rand_augment is not None:
            images = rand_augment(images, rng, epoch, keys, self.rand_augment, self.fill)
        elif cfg.color_jitter:
            images = color_jitter(images, rng, epoch, keys, cfg.color_jitter)
        images = self.normalise(images)
        if cfg.erase_prob > 0:
            images = random_erase(images, rng, epoch, keys, cfg.erase_prob)
        return images, boxes, flips

    def views(self, keys: torch.Tensor, epoch: torch.Tensor, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_views`, compiled when ``augment.compile``: for one static batch size (the
        first seen; a smaller batch is padded with copies of its last sample, which change
        nothing for the others since every view depends only on its own key)."""
        n = keys.shape[0]
        if self.cfg.compile:
            if self.compiled_batch is None or n > self.compiled_batch:
                self.compiled_batch = n
            pad = self.compiled_batch - n
            if pad:
                keys = torch.cat([keys, keys[-1:].expand(pad)])
                pixels = torch.cat([pixels, pixels[-1:].expand(pad, *pixels.shape[1:])])
        height, width, transposed = self.geometry(self.sample_index(keys))
        run = self._compiled_views if self.cfg.compile else self._views
        images, boxes, flips = run(keys, epoch, pixels, height, width, transposed)
        return images[:n], boxes[:n], flips[:n]

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std

    def train_batch(self, keys: torch.Tensor, epoch: int, pixels: torch.Tensor | None = None) -> ViewBatch:
        """The training views of ``keys`` (a 1-D int64 tensor of view keys: sample indices
        unless ``augment.repeats > 1``) in ``epoch``; ``pixels`` are the source images of
        :meth:`pixels_needed` when already gathered."""
        if pixels is None:
            pixels = self._gather(self.pixels_needed(keys, epoch))
        keys = keys.to(self.device)  # a no-op for the device keys of train_batches
        index = self.sample_index(keys)
        n = keys.shape[0]
        epoch_t = torch.full((), epoch, dtype=torch.int64, device=self.device)  # an input, not a constant, to compiled views
        images, boxes, flips = self.views(keys, epoch_t, pixels[:n])
        plan = self._plan(keys, epoch)
        partner_boxes, partner_flips = boxes, flips
        if mixing_enabled(self.cfg):
            # Partner views are rendered for every sample (unmixed ones ignore theirs): no
            # data-dependent shapes, no device sync.
            table_partner = self._partners_for(epoch, on_device=True)[keys]
            partner_images, table_boxes, table_flips = self.views(table_partner, epoch_t, pixels[n:])
            images = apply_mixing(images, partner_images, plan)
            partner_boxes = torch.where(plan.is_mixed[:, None], table_boxes, boxes)
            partner_flips = torch.where(plan.is_mixed, table_flips, flips)
        partner = self.sample_index(plan.partner)
        return self._deliver(
            ViewBatch(
                images=images,
                labels=self.labels[index],
                index=index,
                epoch=epoch,
                view=keys,
                boxes=boxes,
                flips=flips,
                partner=partner,
                partner_labels=self.labels[partner],
                partner_boxes=partner_boxes,
                partner_flips=partner_flips,
                lam=plan.lam,
                mix_boxes=plan.box,
                partner_view=plan.partner,
            )
        )

    def _deliver(self, batch: ViewBatch) -> ViewBatch:
        return batch if self.output_device == self.device else batch.to(self.output_device)

    def _plan(self, keys: torch.Tensor, epoch: int) -> MixPlan:
        """How each view is mixed; ``partner`` holds the partner's view key."""
        if mixing_enabled(self.cfg):
            return plan_mixing(self.rng, epoch, keys, self._partners_for(epoch, on_device=True), self.cfg, self.cfg.input_size)
        n = keys.shape[0]
        false = torch.zeros(n, dtype=torch.bool, device=self.device)
        return MixPlan(
            partner=keys, lam=torch.ones(n, device=self.device), box=torch.zeros(n, 4, device=self.device), is_cutmix=false, is_mixed=false
        )

    def eval_batch(self, index: torch.Tensor) -> ViewBatch:
        """Deterministic evaluation views: centre crop of ``eval_crop_pct``, resized."""
        index = index.to(self.device)
        n = index.shape[0]
        height, width, transposed = self.geometry(index)
        boxes = centre_boxes(n, height, width, self.device, self.cfg.eval_crop_pct)
        flips = torch.zeros(n, dtype=torch.bool, device=self.device)
        images = render(self._gather(index), boxes, flips, self.cfg.input_size, transposed=transposed)
        labels = self.labels[index]
        return self._deliver(
            ViewBatch(
                images=self.normalise(images),
                labels=labels,
                index=index,
                epoch=-1,
                view=index,
                boxes=boxes,
                flips=flips,
                partner=index,
                partner_labels=labels,
                partner_boxes=boxes,
                partner_flips=flips,
                lam=torch.ones(n, device=self.device),
                mix_boxes=torch.zeros(n, 4, device=self.device),
            )
        )


def place_images(
    source: ImageSource, device: torch.device, placement: str = "auto", max_fraction: float = 0.4
) -> tuple[torch.Tensor, bool]:
    """Where the uint8 images live, and whether that is the compute device.

    ``auto``: on the GPU when they take at most ``max_fraction`` of its free memory; on a CPU
    device, in place unless memory-mapped (then read ahead by threads). ``device``/``host``
    force either.
    """
    images = source.images
    if not isinstance(images, torch.Tensor):  # JPEG records: decoded per batch (placement=device decodes them all once)
        return (images.to(device), True) if placement == "device" else (images, False)
    if placement == "auto":
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            placement = "device" if images.numel() <= max_fraction * free else "host"
        else:
            placement = "host" if source.memory_mapped else "device"
    if placement == "device":
        return images.to(device), True
    return images, False
