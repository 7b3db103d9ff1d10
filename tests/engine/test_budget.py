"""Time-budgeted training and `vitdistill bench gpu --smoke` (the GPU evidence command at toy scale)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import interrupted_at_epoch, tiny_run

from vitdistill import ConfigError, load_recipe, train
from vitdistill.cli import main
from vitdistill.config import OptimConfig
from vitdistill.config.parsing import parse_duration
from vitdistill.engine.budget import evaluations_after, plan_steps
from vitdistill.engine.optim import build_scheduler


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("8m", 480), ("1.5m", 90), ("1h30m", 5400), (45, 45)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_bad_budget_is_one_line_naming_the_key():
    with pytest.raises(ConfigError, match="optim.budget: expected a duration"):
        load_recipe("demo_teacher", ["optim.budget=8 minutes"])


def test_the_plan_is_the_largest_schedule_that_fits():
    kwargs = dict(
        budget_s=100.0, elapsed_s=10.0, steps_done=20, step_s=0.05, eval_s=2.0, checkpoint_s=0.5, steps_per_epoch=100, eval_every=1
    )
    plan = plan_steps(**kwargs, max_steps=10**6)

    def cost(total):  # training + evaluations + checkpoints still to come, by hand
        epochs = -(-total // 100)
        return (total - 20) * 0.05 + epochs * 2.0 + epochs * 0.5

    assert cost(plan.total_steps) <= 90.0 < cost(plan.total_steps + 1)
    assert plan.planned_end_s == pytest.approx(10.0 + cost(plan.total_steps))
    assert plan.epochs == -(-plan.total_steps // 100) and plan.evaluations == plan.epochs and not plan.capped_by_epochs
    capped = plan_steps(**kwargs, max_steps=300)
    assert capped.total_steps == 300 and capped.capped_by_epochs
    late = plan_steps(**{**kwargs, "elapsed_s": 150.0}, max_steps=10**6)
    assert late.total_steps == 20  # the budget is spent: stop where we are
    assert evaluations_after(0, 250, 100, eval_every=2) == 2  # epoch 2 and the last (3)


def test_a_compressed_schedule_keeps_the_recipe_shape():
    cfg = OptimConfig(epochs=10, warmup_epochs=2, lr=1e-3, lr_base_batch=None, min_lr=1e-5, warmup_lr=1e-6)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    full = build_scheduler(opt, cfg, steps_per_epoch=50)
    assert full.warmup_t == 100 and full.t_initial == 400  # unchanged without a budget
    short = build_scheduler(opt, cfg, steps_per_epoch=50, total_steps=120)
    assert short.warmup_t == 24 and short.t_initial == 96  # warmup: 2/10 of the schedule
    lrs = []
    for step in (0, 24, 120):
        short.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-6) and lrs[1] == pytest.approx(1e-3) and lrs[2] == pytest.approx(1e-5)


def test_a_budgeted_run_plans_once_and_a_resumed_run_keeps_its_plan(tmp_path):
    overrides = tiny_run(tmp_path / "run", "model.name=vitdistill_convnet_tiny", "optim.epochs=400", "optim.budget=12s")
    with interrupted_at_epoch(2), pytest.raises(KeyboardInterrupt):
        train(load_recipe("demo_teacher", overrides))
    plan = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["budget_plan"]
    assert plan["budget_s"] == 12.0 and plan["total_steps"] > 8 and plan["planned_at_step"] == 8  # planned after epoch 1 (8 steps)
    resumed = train(load_recipe("demo_teacher", overrides), resume=True)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["budget"]["total_steps"] == plan["total_steps"]  # the same schedule, not a new plan
    assert len(resumed.history) == -(-plan["total_steps"] // 8)  # 256 images / batch 32: 8 steps an epoch


def test_bench_gpu_smoke_reports_every_stage_and_each_ends_on_time(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "gpu", "--smoke", "--budget", "2m", "--output", str(out)])
    report = json.loads((out / "gpu.json").read_text())
    assert code == 0, {k: v.get("error") for k, v in report["stages"].items()}
    assert report["format"] == "vitdistill-bench-gpu/1" and report["smoke"] and report["budget_s"] == 120
    assert {"device", "torch", "timm", "cuda", "python"} <= set(report["machine"])
    assert list(report["stages"]) == ["throughput", "teacher", "distilled", "baseline", "store", "token_label"]
    assert all(stage["status"] == "done" for stage in report["stages"].values()), report["stages"]
    throughput = report["stages"]["throughput"]["result"]
    assert not throughput["errors"] and all(
        throughput[k] > 0
        for k in (
            "a_bare_img_s",
            "b_pipeline_img_s",
            "c_pipeline_teacher_img_s",
            "d_loader_img_s",
            "d_loader_teacher_img_s",
            "e_pipeline_store_img_s",
        )
    )
    for name in ("teacher", "distilled", "baseline"):
        stage = report["stages"][name]
        assert stage["on_time"] and abs(stage["run_s"] - stage["budget_s"]) <= 0.15 * stage["budget_s"], (
            name,
            stage["run_s"],
            stage["budget_s"],
        )
        assert 0 <= stage["top1_last"] <= 100 and stage["train_img_per_s"] > 0 and stage["command"].startswith("vitdistill train ")
    assert report["stages"]["distilled"]["budget_s"] == report["stages"]["baseline"]["budget_s"]  # equal budgets
    assert report["stages"]["teacher"]["top1_last"] > 30.0  # chance is 10%
    assert report["sync_check"]["synchronising_calls"] == 0
    assert report["total_s"] <= 1.15 * 120
    table = (out / "gpu.md").read_text()
    assert "| distilled: DeiT-Ti/4, hard distillation" in table and "Synchronising calls in 5 training steps" in table
    capsys.readouterr()
    assert main(["bench", "gpu", "--smoke", "--budget", "2m", "--output", str(out)]) == 0  # again: finished stages are kept
    assert capsys.readouterr().out.count("done in an earlier run, kept") == 6


def budget_after_first_plan(step_s: float, planned_end_s: float):
    """A Budget whose first plan (made at 3 s, 8 steps an epoch) assumed ``step_s`` per step; its
    clock is the test's (``clock.now``)."""
    from vitdistill.device import DistEnv
    from vitdistill.engine.budget import Budget

    budget = Budget(
        "60s",
        0.0,
        DistEnv(0, 1, torch.device("cpu")),
        lambda: None,
        steps_per_epoch=8,
        eval_every=1,
        max_steps=8 * 1000,
        probe=lambda epoch: (0.01, 0.01),
    )
    budget.clock.now = 3.0
    budget.clock.elapsed = lambda: budget.clock.now
    budget.make_plan(8, step_s, announce=False)
    budget.costs_from = 0
    assert budget.plan.planned_end_s == pytest.approx(planned_end_s, abs=1.0)
    return budget


def test_a_plan_far_off_the_measured_rate_is_corrected_before_its_quarter_point():
    # the first plan measured 0.3 s/step on a busy machine; the epochs since run at 0.015 s/step
    budget = budget_after_first_plan(0.3, 58.3)
    first = budget.plan.total_steps
    for epoch in (2, 3):
        budget.clock.now += 8 * 0.015 + 0.02
        revised = budget.end_epoch(epoch * 8, 8, 8 * 0.015, 0.01, 8 * 0.015 + 0.02)
    assert budget.clock.now < budget.plan.planned_at_s + 0.25 * (58.3 - 3.0)  # long before the quarter point
    assert revised is not None and revised.total_steps > 10 * first and budget.revisions == 1


def test_a_plan_near_the_measured_rate_waits_for_its_quarter_point():
    budget = budget_after_first_plan(0.02, 58.3)
    for epoch in (2, 3):
        budget.clock.now += 8 * 0.025 + 0.02
        assert budget.end_epoch(epoch * 8, 8, 8 * 0.025, 0.01, 8 * 0.025 + 0.02) is None  # 25% off: not yet due
    budget.clock.now = 3.0 + 0.25 * 55.3 + 0.1
    assert budget.end_epoch(4 * 8, 8, 8 * 0.025, 0.01, 8 * 0.025 + 0.02) is not None and budget.revisions == 1
