"""Teacher sources are a registry: a new kind is one class in one file (this one), chosen by a
recipe's ``teacher.kind`` with its own validated parameters, built by the runner's lookup, and
its targets reach the objective. The built-in kinds keep their recipe keys and their rules."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_DEIT, tiny_run

from vitdistill import ConfigError, UserError, load_recipe, train
from vitdistill.config import RunConfig, TeacherConfig
from vitdistill.config.paths import with_absolute_paths
from vitdistill.data import ImageSource, train_batches
from vitdistill.device import DistEnv
from vitdistill.runner import build_targets, build_trainer
from vitdistill.targets import (
    SOURCES,
    LabelMapTargets,
    OnlineTeacher,
    Request,
    StoreTargets,
    TeacherPrediction,
    TeacherSource,
    register_source,
    source_class,
)

CPU = DistEnv(0, 1, torch.device("cpu"))
STUDENT = [*TINY_DEIT, "model.name=deit_tiny_patch16_224", "teacher.checkpoint=null"]  # no distillation head


@register_source
class ConstantTeacher(TeacherSource):
    """A toy teacher that says the same about every view: ``p(label) = confidence``, the rest
    spread evenly over the other classes."""

    kind = "test_constant"
    gives = frozenset({"probs", "hard_labels"})
    calls = 0  # batches answered (all instances)

    @dataclass
    class Params:
        label: int = 0
        confidence: float = 0.9

        def validate(self, key: str) -> None:
            if not 0 < self.confidence <= 1:
                raise ConfigError(f"{key}.confidence", "must be in (0, 1]")

    def __init__(self, params: Params, num_classes: int, device: torch.device):
        rest = (1 - params.confidence) / (num_classes - 1)
        self.probs = torch.full((num_classes,), rest, device=device)
        self.probs[params.label] = params.confidence

    @classmethod
    def from_recipe(cls, cfg: RunConfig, source: ImageSource, request: Request, device: torch.device) -> ConstantTeacher:
        assert cfg.teacher is not None
        return cls(cls.parse_params(cfg.teacher), source.num_classes, device)

    def __call__(self, batch) -> TeacherPrediction:
        type(self).calls += 1
        return TeacherPrediction(probs=self.probs.expand(len(batch.labels), -1))


def constant_recipe(tmp_path, *extra: str):
    teacher = "teacher={kind: test_constant, params: {label: 3, confidence: 0.7}}"
    return load_recipe("demo_student", tiny_run(tmp_path / "run", *STUDENT, teacher, "objective=[{term: kd_soft, tau: 1.0}]", *extra))


def test_a_registered_kind_is_built_by_the_runner_and_its_targets_reach_the_objective(tmp_path):
    cfg = constant_recipe(tmp_path)
    assert source_class(cfg.teacher) is ConstantTeacher
    trainer = build_trainer(cfg, CPU, tmp_path / "run")
    assert isinstance(trainer.teacher, ConstantTeacher)
    views = trainer.train_views
    keys = train_batches(len(views.source), cfg.optim.batch_size, views.rng, 0)[0]
    batch = next(iter(views.train_batches([keys], 0)))
    trainer.step_module.eval()
    with torch.no_grad():
        loss, parts = trainer.step_module(batch, trainer.teacher(batch))
        log_s = F.log_softmax(trainer.model(batch.images).head("cls").float(), dim=-1)
    # by hand: KL(p || psi(Z_s)) with p the constant distribution, averaged over the batch
    p = torch.full((10,), 0.3 / 9)
    p[3] = 0.7
    expected = (p * (p.log() - log_s)).sum(dim=1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert list(parts) == ["kd_soft"]
    other = constant_recipe(tmp_path, "teacher.params.label=4")  # another target, another loss
    with torch.no_grad():
        moved, _ = trainer.step_module(batch, source_class(other.teacher).build(other, views.source, Request(), CPU.device)(batch))
    assert abs(moved.item() - loss.item()) > 1e-3


def test_a_registered_kind_trains_end_to_end(tmp_path):
    before = ConstantTeacher.calls
    result = train(constant_recipe(tmp_path, "optim.epochs=1"))
    assert ConstantTeacher.calls - before == 256 // 32  # every training step asked it
    assert math.isfinite(result.final["train_kd_soft"]) and result.final["train_kd_soft"] > 0
    assert (tmp_path / "run" / "config.yaml").read_text().count("test_constant") == 1


def test_a_kinds_parameters_are_its_own_and_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"teacher\.params\.confidence"):
        constant_recipe(tmp_path, "teacher.params.confidence=1.5")
    with pytest.raises(ConfigError, match=r"teacher\.params\.tau: unknown key"):
        constant_recipe(tmp_path, "teacher.params.tau=2")
    with pytest.raises(ConfigError, match=r"teacher\.params\.label: unknown key"):  # built-in kinds take none
        load_recipe("demo_student_distilled", tiny_run(tmp_path / "x", "teacher.params={label: 1}"))
    with pytest.raises(ConfigError, match=r"teacher\.kind: unknown teacher source 'nope' \(known: .*online.*store"):
        load_recipe("demo_student_distilled", tiny_run(tmp_path / "x", "teacher.kind=nope"))


def test_a_kind_asked_for_what_it_does_not_give_is_refused_before_it_is_built(tmp_path):
    cfg = load_recipe("fd_pretrain_digits", tiny_run(tmp_path / "fd", "teacher={kind: test_constant}"))
    with pytest.raises(UserError, match=r"teacher\.kind=test_constant: the objective distils feature maps, which only an online teacher"):
        build_trainer(cfg, CPU, tmp_path / "fd")


def test_built_in_kinds_are_chosen_by_their_keys_and_own_their_rules(tmp_path):
    assert {"online", "store", "label_maps", "test_constant"} <= set(SOURCES)
    assert source_class(TeacherConfig(checkpoint="t")) is OnlineTeacher
    assert source_class(TeacherConfig(checkpoint="t", store="s")) is StoreTargets  # the checkpoint names the store's teacher
    assert source_class(TeacherConfig(name="resnet18", label_maps="m")) is LabelMapTargets
    assert source_class(TeacherConfig(kind="test_constant", checkpoint="t")) is ConstantTeacher
    assert StoreTargets.gives == {"probs", "hard_labels"} and "token_probs" in LabelMapTargets.gives and "features" in OnlineTeacher.gives
    recipe = ["demo_student_distilled", "teacher.checkpoint=null"]
    cases = {
        "teacher.checkpoint=a": "teacher: give checkpoint .* or name .*, not both",  # with the recipe's name below
        "teacher.store=s": "teacher: give store or label_maps, not both",
        "teacher.kind=test_constant": "teacher: give label_maps or kind test_constant, not both",
        "teacher.kind=store": r"teacher\.store: kind store reads the store folder",
    }
    for extra, message in cases.items():
        base = {"teacher.checkpoint=a": "teacher.name=resnet18"}.get(extra, "teacher.label_maps=m")
        with pytest.raises(ConfigError, match=message):
            load_recipe(recipe[0], tiny_run(tmp_path / "x", recipe[1], base, extra))
    needs = r"teacher: needs checkpoint \(a vitdistill export\), name \(\+ weights\), store \(vitdistill cache\) or label_maps"
    with pytest.raises(ConfigError, match=needs):
        load_recipe(recipe[0], tiny_run(tmp_path / "x", recipe[1]))


def test_each_kind_registers_its_path_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_recipe("demo_student_distilled", tiny_run(tmp_path / "x", "teacher.store=stores/a"))
    cfg.teacher.label_maps, cfg.teacher.weights = "maps/b", "w.pth"
    absolute = with_absolute_paths(cfg).teacher
    assert absolute.store == str(tmp_path / "stores" / "a") and absolute.label_maps == str(tmp_path / "maps" / "b")
    assert absolute.weights == str(tmp_path / "w.pth") and absolute.kind is None  # not a path


def test_registering_a_kind_twice_or_with_unknown_capabilities_is_refused():
    class Again(TeacherSource):
        kind = "test_constant"

    class Odd(TeacherSource):
        kind = "test_odd"
        gives = frozenset({"logits", "telepathy"})

    with pytest.raises(ValueError, match="registered twice"):
        register_source(Again)
    with pytest.raises(ValueError, match="telepathy"):
        register_source(Odd)
    assert SOURCES["test_constant"] is ConstantTeacher and "test_odd" not in SOURCES


def test_build_targets_is_the_lookup(tmp_path):
    cfg = constant_recipe(tmp_path)
    from vitdistill.data import open_source
    from vitdistill.models import build_model

    source = open_source(cfg.data, cfg.data.train_split, cfg.data.train_limit)
    model = build_model(cfg.model, source.num_classes, input_size=cfg.augment.input_size)
    targets = build_targets(cfg, model, source, CPU)
    assert isinstance(targets, ConstantTeacher) and targets.probs[3].item() == pytest.approx(0.7)
