"""Each term against its equation on hand-made tensors, and head routing."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import batch_of

from vitdistill.errors import ConfigError
from vitdistill.models import ModelOutput
from vitdistill.objective import Objective
from vitdistill.targets import TeacherPrediction


def single(term: dict, num_classes: int = 3, has_dist: bool = True) -> Objective:
    return Objective([term], num_classes, has_dist)


ZS = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
ZD = torch.tensor([[0.0, 1.5, -0.5], [1.0, -1.0, 0.0]])
ZT = torch.tensor([[1.0, 3.0, 0.0], [0.5, 0.0, 2.5]])


def softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_ce_with_smoothing_and_mixing_matches_the_formula():
    batch = batch_of([0, 2], partner_labels=[1, 2], lam=[0.7, 1.0])
    loss, _ = single({"term": "ce", "smoothing": 0.1, "head": "cls"})(ModelOutput(ZS, ZD), batch, None)
    eps, c = 0.1, 3
    expected = 0.0
    for row, (y, yp, lam) in zip(ZS.tolist(), [(0, 1, 0.7), (2, 2, 1.0)]):
        p = softmax(row)
        target = [lam * ((1 - eps) * (k == y) + eps / c) + (1 - lam) * ((1 - eps) * (k == yp) + eps / c) for k in range(c)]
        expected += -sum(t * math.log(q) for t, q in zip(target, p))
    assert loss.item() == pytest.approx(expected / 2, rel=1e-6)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_kd_soft_is_tau_squared_kl_teacher_student(tau):
    loss, _ = single({"term": "kd_soft", "tau": tau, "head": "dist"})(ModelOutput(ZS, ZD), batch_of([0, 1]), TeacherPrediction(logits=ZT))
    expected = 0.0
    for s_row, t_row in zip(ZD.tolist(), ZT.tolist()):
        ps, pt = softmax([v / tau for v in s_row]), softmax([v / tau for v in t_row])
        expected += sum(t * (math.log(t) - math.log(s)) for t, s in zip(pt, ps))
    expected = tau * tau * expected / 2  # batchmean: sum over classes, mean over the batch
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_kd_soft_deit_normalisation_is_classes_times_smaller():
    out, t = ModelOutput(ZS, ZD), TeacherPrediction(logits=ZT)
    batchmean, _ = single({"term": "kd_soft", "tau": 2.0})(out, batch_of([0, 1]), t)
    deit, _ = single({"term": "kd_soft", "tau": 2.0, "normalization": "deit"})(out, batch_of([0, 1]), t)
    assert batchmean.item() == pytest.approx(3 * deit.item(), rel=1e-6)


def test_kd_soft_is_zero_when_student_equals_teacher():
    loss, _ = single({"term": "kd_soft", "tau": 4.0, "head": "cls"})(
        ModelOutput(ZT.clone()), batch_of([0, 1]), TeacherPrediction(logits=ZT)
    )
    assert abs(loss.item()) < 1e-6


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_kd_hard_uses_teacher_argmax_with_optional_smoothing(eps):
    labels = [2, 0]  # deliberately not the teacher's argmax (1, 2): kd_hard must ignore them
    loss, _ = single({"term": "kd_hard", "smoothing": eps, "head": "dist"})(
        ModelOutput(ZS, ZD), batch_of(labels), TeacherPrediction(logits=ZT)
    )
    expected = 0.0
    for row, yt in zip(ZD.tolist(), [1, 2]):
        p = softmax(row)
        target = [(1 - eps) * (k == yt) + eps / 3 for k in range(3)]
        expected += -sum(t * math.log(q) for t, q in zip(target, p))
    assert loss.item() == pytest.approx(expected / 2, rel=1e-6)


def test_deit_hard_objective_routes_label_to_class_head_and_teacher_to_dist_head():
    objective = Objective([{"term": "ce", "weight": 0.5}, {"term": "kd_hard", "weight": 0.5}], 3, has_dist_head=True)
    assert [t.head for t in objective.terms] == ["cls", "dist"]  # the `auto` routes
    batch, teacher = batch_of([0, 1]), TeacherPrediction(logits=ZT)
    total, parts = objective(ModelOutput(ZS, ZD), batch, teacher)
    ce_cls, _ = single({"term": "ce", "head": "cls"})(ModelOutput(ZS, ZD), batch, None)
    kd_dist, _ = single({"term": "kd_hard", "head": "dist"})(ModelOutput(ZS, ZD), batch, teacher)
    assert total.item() == pytest.approx(0.5 * ce_cls.item() + 0.5 * kd_dist.item(), rel=1e-6)
    assert set(parts) == {"ce@cls", "kd_hard@dist"}


def test_gradients_reach_only_the_routed_head():
    zs, zd = ZS.clone().requires_grad_(), ZD.clone().requires_grad_()
    total, _ = Objective([{"term": "kd_hard"}], 3, True)(ModelOutput(zs, zd), batch_of([0, 1]), TeacherPrediction(logits=ZT))
    total.backward()
    assert zs.grad is None or zs.grad.abs().sum() == 0
    assert zd.grad.abs().sum() > 0


def test_class_token_only_variant_routes_teacher_to_class_head():
    objective = Objective([{"term": "ce", "weight": 0.5}, {"term": "kd_hard", "weight": 0.5}], 3, has_dist_head=False)
    assert [t.head for t in objective.terms] == ["cls", "cls"]


def test_dist_head_on_a_one_head_model_is_an_error():
    with pytest.raises(ConfigError, match="distillation head"):
        Objective([{"term": "kd_hard", "head": "dist"}], 3, has_dist_head=False)


def test_mean_head_is_the_average_of_the_two_heads():
    out = ModelOutput(ZS, ZD)
    assert torch.allclose(out.head("mean"), (ZS + ZD) / 2)
    assert set(out.heads) == {"cls", "dist", "mean"}
    assert set(ModelOutput(ZS).heads) == {"cls"}


def test_losses_are_fp32_under_bf16_logits():
    out = ModelOutput(ZS.bfloat16(), ZD.bfloat16())
    loss, _ = single({"term": "kd_soft", "tau": 2.0})(out, batch_of([0, 1]), TeacherPrediction(logits=ZT.bfloat16()))
    assert loss.dtype == torch.float32


def test_stored_probabilities_refuse_another_temperature():
    prediction = TeacherPrediction(probs=torch.softmax(ZT, -1), temperature=1.0)
    assert torch.equal(prediction.hard_labels(), torch.tensor([1, 2]))
    with pytest.raises(Exception, match="temperature"):
        prediction.log_probs(3.0)
