"""Label maps as a teacher source: each student token gets the teacher's label of its region.

The maps' format and writer (``vitdistill labelmaps``) live in :mod:`vitdistill.labelmaps`; this
is their reader.

For every view, the dense map of its source image is pooled with ``roi_align`` over the view's
crop box, in source coordinates ``(x1, y1, x2, y2)`` as torchvision expects (the reference
implementation passes ``(y1, x1, y2, x2)`` and so labels the transposed region), to the
student's token grid, plus one pooled target for the whole crop; the view's flip is applied.
Mixed views (mixup/cutmix) mix their own and their partner's pooled targets, per token with the
share of the token's pixels each image contributes.

``mode`` turns the stored top-k scores into distributions:

* ``topk_softmax``: per location, softmax over the k stored logits (other classes 0); pooling
  averages these distributions.
* ``zero_filled`` (the reference's): per location, dense logits with the k stored values and
  zeros elsewhere; pooling averages logits; softmax over all classes after pooling.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.ops import roi_align

from ..augment import ViewBatch
from ..augment.mixing import token_own_share
from ..augment.randaugment import geometric_warps, parse_rand_augment, warp_affine
from ..config import RunConfig, TeacherConfig
from ..data import ImageSource
from ..errors import ConfigError, UserError
from ..rng import CounterRNG
from .labelmap_format import LabelMapManifest, read_records
from .offline import check_provenance
from .prediction import TeacherPrediction
from .source import Request, TeacherSource, register_source


def pool_tokens(
    dense: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, source_size, grid, transposed: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool ``[B, C, h, w]`` maps over each crop box (source pixels) to ``grid`` tokens and to one
    value for the whole crop: ``([B, gh * gw, C], [B, C])`` in raster order, flips applied.
    ``transposed`` ([B] bool): records that hold their image transposed (as in
    :func:`~vitdistill.augment.geometry.render`: the box is read transposed and the pooled grid
    transposed back)."""
    b, _, h, w = dense.shape
    if transposed is not None:
        boxes = torch.where(transposed[:, None], boxes[:, [1, 0, 3, 2]], boxes)
    sx, sy = w / source_size[1], h / source_size[0]  # Python scales: no host-to-device copy
    scaled = torch.stack([boxes[:, 0] * sx, boxes[:, 1] * sy, boxes[:, 2] * sx, boxes[:, 3] * sy], dim=1)
    rois = torch.cat([torch.arange(b, device=dense.device, dtype=dense.dtype)[:, None], scaled.to(dense.dtype)], dim=1)
    tokens = roi_align(dense, rois, output_size=tuple(grid), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    crop = roi_align(dense, rois, output_size=(1, 1), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    if transposed is not None:
        tokens = torch.where(transposed[:, None, None, None], tokens.transpose(-1, -2), tokens)
    tokens = torch.where(flips[:, None, None, None], tokens.flip(-1), tokens)
    return tokens.flatten(2).transpose(1, 2), crop.flatten(1)


def to_distribution(pooled: torch.Tensor, mode: str) -> torch.Tensor:
    """Pooled scores -> distributions over the last dimension."""
    if mode == "zero_filled":
        return torch.softmax(pooled, dim=-1)
    total = pooled.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(pooled, 1.0 / pooled.shape[-1])
    return torch.where(total > 1e-6, pooled / total.clamp_min(1e-6), uniform)  # a region wholly in the padding: uniform


@register_source
class LabelMapTargets(TeacherSource):
    """Teacher predictions for views, from label maps: ``probs`` for the whole crop and
    ``token_probs`` per student token. All maps are kept on ``device`` (CIFAR-10 with a 4x4
    map and k=5: 16 MB). Chosen by ``teacher.label_maps`` (the folder ``vitdistill labelmaps``
    wrote); reads each view's crop box, flip and mixing, and the student's token grid."""

    kind = "label_maps"
    fields = ("label_maps",)
    path_keys = ("label_maps",)
    title = "label maps (teacher.label_maps)"
    hint = "label_maps (vitdistill labelmaps)"
    gives = frozenset({"probs", "hard_labels", "token_probs"})
    needs = frozenset({"boxes", "token_grid"})

    @classmethod
    def check(cls, teacher: TeacherConfig, key: str) -> None:
        if teacher.label_maps is None:
            raise ConfigError(f"{key}.label_maps", "kind label_maps reads the label-map folder named here (vitdistill labelmaps writes it)")

    @classmethod
    def from_recipe(cls, cfg: RunConfig, source: ImageSource, request: Request, device: torch.device) -> LabelMapTargets:
        assert cfg.teacher is not None and cfg.teacher.label_maps is not None
        if request.token_grid is None:
            raise UserError(f"teacher.label_maps: token targets need a vision transformer; {cfg.model.name} has no patch grid")
        return cls(cfg.teacher.label_maps, cfg, source, request.token_grid, device)

    def __init__(self, folder: str | Path, cfg: RunConfig, source: ImageSource, grid: tuple[int, int], device: torch.device):
        assert cfg.teacher is not None
        self.folder = Path(folder)
        self.manifest = manifest = LabelMapManifest.read(self.folder)
        check_provenance(f"teacher.label_maps: {self.folder} was written for", manifest.dataset, manifest.teacher, manifest.k, cfg, source)
        # RandAugment's rotate/shear/translate move the view under its tokens: the token targets
        # follow (the warps are re-derived from the view's own random draws)
        self.rand_augment = parse_rand_augment(cfg.augment.rand_augment) if cfg.augment.rand_augment else None
        self.view_size = cfg.augment.input_size
        self.rng = CounterRNG(cfg.seed)
        records = read_records(self.folder, manifest)
        self.ids = torch.from_numpy(np.ascontiguousarray(records["ids"])).to(device)  # [N, h, w, k] int16: widened per batch
        self.scores = torch.from_numpy(np.ascontiguousarray(records["scores"])).to(device)
        self.mode = cfg.teacher.label_map_mode
        self.grid = grid
        self.source_size = manifest.source_size
        self.transposed = source.sizes[:, 2].bool().to(device) if source.sizes is not None else None  # portrait records

    def dense(self, index: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]``: per-location probabilities (topk_softmax) or zero-filled logits."""
        ids, scores = self.ids[index].long(), self.scores[index].float()
        values = torch.softmax(scores, dim=-1) if self.mode == "topk_softmax" else scores
        b, h, w, _ = ids.shape
        dense = values.new_zeros(b, h, w, self.manifest.num_classes).scatter_(-1, ids, values)
        return dense.permute(0, 3, 1, 2)

    def targets(self, index, boxes, flips) -> tuple[torch.Tensor, torch.Tensor]:
        transposed = self.transposed[index] if self.transposed is not None else None
        tokens, crop = pool_tokens(self.dense(index), boxes, flips, self.source_size, self.grid, transposed)
        return to_distribution(tokens, self.mode), to_distribution(crop, self.mode)

    def follow_warps(self, tokens: torch.Tensor, epoch: int, keys: torch.Tensor) -> torch.Tensor:
        """``[B, N, C]`` token targets warped as RandAugment warped the views of ``keys``."""
        if self.rand_augment is None:
            return tokens
        return warp_token_targets(
            tokens, geometric_warps(self.rng, epoch, keys, self.rand_augment, self.view_size), self.grid, self.view_size
        )

    def __call__(self, batch: ViewBatch) -> TeacherPrediction:
        own_tokens, own_crop = self.targets(batch.index, batch.boxes, batch.flips)
        partner_tokens, partner_crop = self.targets(batch.partner, batch.partner_boxes, batch.partner_flips)
        if batch.epoch >= 0:  # training views (evaluation views are not augmented)
            own_tokens = self.follow_warps(own_tokens, batch.epoch, batch.view)
            partner_tokens = self.follow_warps(partner_tokens, batch.epoch, batch.partner_view)
        share = token_own_share(batch.mix_boxes, batch.lam, batch.images.shape[-2:], own_tokens.shape[1])[..., None]
        lam = batch.lam.float()[:, None]
        return TeacherPrediction(
            probs=lam * own_crop + (1 - lam) * partner_crop,
            token_probs=share * own_tokens + (1 - share) * partner_tokens,
        )


def warp_token_targets(tokens: torch.Tensor, warps: list[tuple[torch.Tensor, torch.Tensor]], grid, view_size: int) -> torch.Tensor:
    """Apply views' affine warps (per slot: Pillow matrices over the ``view_size`` view and where
    they applied, :func:`~vitdistill.augment.randaugment.geometric_warps`) to ``[B, N, C]``
    token targets on the ``grid`` raster, in slot order, as the pixels were warped.

    A token is a ``view_size / g`` square of the view, so the same matrix in token units keeps
    its linear part and divides its translation by the token side; each token takes the
    bilinear target of the point it came from, and one whose source lies outside the view (the
    fill colour in the image) the uniform distribution.
    """
    b, n, c = tokens.shape
    gh, gw = grid
    maps = tokens.transpose(1, 2).reshape(b, c, gh, gw)
    uniform = torch.full((c,), 1.0 / c, dtype=maps.dtype, device=maps.device)
    scale = torch.tensor([[1.0, 1.0, gw / view_size], [1.0, 1.0, gh / view_size]], dtype=torch.float64, device=maps.device)
    for matrix, applied in warps:
        warped = warp_affine(maps, matrix * scale, uniform)
        maps = torch.where(applied.view(b, 1, 1, 1), warped, maps)
    return maps.reshape(b, c, n).transpose(1, 2)
