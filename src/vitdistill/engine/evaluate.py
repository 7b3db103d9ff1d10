"""Top-1/top-5 of every head (class, distillation, their mean) on the evaluation views."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..augment import Augmenter
from ..data import eval_batches
from ..device import DistEnv, all_reduce_sum, autocast
from ..progress import progress
from .metrics import topk_correct


@torch.no_grad()
def evaluate(
    model: nn.Module, views: Augmenter, batch_size: int, env: DistEnv, precision: str = "auto", show_progress: bool = False
) -> dict[str, float]:
    """Accuracy (%) per head and the cross-entropy of the inference head.

    ``top1``/``top5`` are the inference head's (``ModelOutput.inference``): the mean of the two
    heads for a distilled model, the class head otherwise, plus LV-ViT's token term with
    ``model.eval_head: lvvit_aux``. ``top1_cls``, ``top1_dist``, ``top1_mean`` are each head's
    (reported when the inference head is not simply the class head).
    """
    was_training = model.training
    model.eval()
    counts: dict[str, torch.Tensor] = {}
    loss_sum = torch.zeros((), device=env.device)
    seen = torch.zeros((), device=env.device)
    batches = eval_batches(len(views.source), batch_size, env.rank, env.world, views.images.device)  # where the pixels are read
    for index in progress(batches, desc="evaluating", enabled=show_progress and env.is_main):
        batch = views.eval_batch(index)
        with autocast(env.device, precision):
            out = model(batch.images)
        heads = {"": out.inference().float()}  # the inference head (= cls for one-head models with eval_head cls)
        if out.dist_logits is not None or out.eval_head != "cls":
            heads.update({f"_{name}": logits.float() for name, logits in out.heads.items()})
        for suffix, logits in heads.items():
            top1, top5 = topk_correct(logits, batch.labels)
            counts[f"top1{suffix}"] = counts.get(f"top1{suffix}", 0) + top1
            counts[f"top5{suffix}"] = counts.get(f"top5{suffix}", 0) + top5
        loss_sum += F.cross_entropy(heads[""], batch.labels, reduction="sum")
        seen += batch.labels.numel()
    names = sorted(counts, key=lambda k: (len(k), k))  # top1, top5, then per head
    stacked = all_reduce_sum(torch.stack([counts[n].float() for n in names] + [loss_sum, seen]), env).tolist()
    total = max(stacked[-1], 1.0)
    result = {name: 100.0 * value / total for name, value in zip(names, stacked)}
    result["loss"] = stacked[-2] / total
    model.train(was_training)
    return result
