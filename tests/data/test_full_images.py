"""Full images (aspect kept in padded records), repeated augmentation, and token targets that
follow RandAugment's geometric ops (issue 12)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import TINY_DEIT, tiny_run
from PIL import Image

from vitdistill import load_recipe, train
from vitdistill.augment import Augmenter
from vitdistill.augment.geometry import pad_crop_boxes
from vitdistill.augment.randaugment import RandAugmentSpec, geometric_warps, rand_augment
from vitdistill.config import AugmentConfig, DataConfig
from vitdistill.data import epoch_order, open_source, train_batches
from vitdistill.rng import CounterRNG
from vitdistill.store import write_store
from vitdistill.targets.labelmaps import pool_tokens, warp_token_targets

RED, BLUE = (255, 0, 0), (0, 0, 255)


def two_colour(width: int, height: int, split: str) -> Image.Image:
    """Red on the left (split='x') or top (split='y') half, blue on the other."""
    img = Image.new("RGB", (width, height), BLUE)
    img.paste(Image.new("RGB", (width // 2, height) if split == "x" else (width, height // 2), RED), (0, 0))
    return img


@pytest.fixture()
def mixed_sizes(tmp_path):
    """A landscape 400x300, a portrait 300x400 and a very wide 640x300 image per class."""
    root = tmp_path / "mixed"
    for split in ("train", "test"):
        for name in ("a", "b"):
            folder = root / split / name
            folder.mkdir(parents=True)
            two_colour(400, 300, "x").save(folder / "0_landscape.png")
            two_colour(300, 400, "y").save(folder / "1_portrait.png")
            two_colour(640, 300, "x").save(folder / "2_wide.png")
    return root


def test_records_keep_the_aspect_up_to_max_aspect(mixed_sizes, tmp_path):
    source = open_source(DataConfig(root=str(mixed_sizes), cache_dir=str(tmp_path / "cache"), source_size=64), "train")
    assert source.image_size == (64, 85)  # short side 64, long side up to 4/3 of it
    assert source.sizes.tolist()[:3] == [[64, 85, 0], [85, 64, 1], [64, 85, 0]]  # portrait stored transposed; wide cropped to 4/3
    portrait = source.images[1].numpy()  # transposed: the image's top (red) is the record's left
    assert (portrait[:, :40] == RED).all() and (portrait[:, 45:] == BLUE).all()  # 64x85 image, 85 long: the record is full
    wider = open_source(DataConfig(root=str(mixed_sizes), cache_dir=str(tmp_path / "cache"), source_size=64, max_aspect=2.5), "train")
    assert wider.image_size == (64, 160) and wider.sizes[2].tolist() == [64, 137, 0]  # 640x300 -> 137x64, kept whole


def test_crops_cover_the_whole_image_in_its_own_orientation(mixed_sizes, tmp_path):
    source = open_source(DataConfig(root=str(mixed_sizes), cache_dir=str(tmp_path / "cache"), source_size=64), "train")
    cfg = AugmentConfig(input_size=16, crop="rrc", scale=(0.05, 0.2), hflip=0.0)
    views = Augmenter(source, cfg, 0, (0.5,) * 3, (0.5,) * 3, torch.device("cpu"))
    boxes = torch.cat([views.train_batch(torch.tensor([0, 1]), epoch=e).boxes for e in range(300)])
    landscape, portrait = boxes[0::2], boxes[1::2]
    assert landscape[:, 2].max() > 80 and landscape[:, 3].max() <= 64  # crops reach the sides of the 85x64 image
    assert portrait[:, 3].max() > 80 and portrait[:, 2].max() <= 64  # and the bottom of the 64x85 one
    batches = [views.train_batch(torch.tensor([0, 1]), epoch=e) for e in range(20)]
    batch = type(batches[0])(
        **{
            f: torch.cat([getattr(b, f) for b in batches]) if torch.is_tensor(getattr(batches[0], f)) else 0
            for f in batches[0].__dataclass_fields__
        }
    )
    for i in range(40):  # each crop shows the colour its box covers, in the image's own orientation
        x1, y1, x2, y2 = batch.boxes[i].tolist()
        centre = ((x1 + x2) / 2, (y1 + y2) / 2)
        red_side = centre[0] < 42.5 if i % 2 == 0 else centre[1] < 42.5
        pixel = batch.images[i, :, 8, 8] * 0.5 + 0.5  # un-normalised centre pixel of the view
        inner = (x2 - x1) > 4 and abs((centre[0] if i % 2 == 0 else centre[1]) - 42.5) > (x2 - x1 if i % 2 == 0 else y2 - y1) / 2
        if inner:  # the box lies wholly in one half
            assert (pixel[0] > pixel[2]) == red_side, (i, batch.boxes[i])


def test_evaluation_is_the_centred_crop_of_the_short_side(mixed_sizes, tmp_path):
    source = open_source(DataConfig(root=str(mixed_sizes), cache_dir=str(tmp_path / "cache"), source_size=64), "test")
    views = Augmenter(source, AugmentConfig(input_size=8, eval_crop_pct=1.0), 0, (0.0,) * 3, (1.0,) * 3, torch.device("cpu"))
    batch = views.eval_batch(torch.arange(3))
    assert batch.boxes[:2].tolist() == [[10.5, 0.0, 74.5, 64.0], [0.0, 10.5, 64.0, 74.5]]
    portrait = batch.images[1]  # top half red, bottom half blue, not left/right
    assert (portrait[0, :3] > 0.9).all() and (portrait[2, 5:] > 0.9).all()


def test_same_sized_non_square_images_train_and_evaluate_on_the_same_square(tmp_path):
    for split in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / "wide" / split / name).mkdir(parents=True)
            two_colour(48, 40, "x").save(tmp_path / "wide" / split / name / "0.png")
    source = open_source(DataConfig(root=str(tmp_path / "wide"), cache_dir=str(tmp_path / "cache")), "train")
    assert source.sizes is None and source.image_size == (40, 48)  # stored as it is
    views = Augmenter(source, AugmentConfig(input_size=8, crop="none", hflip=0.0), 0, (0.0,) * 3, (1.0,) * 3, torch.device("cpu"))
    train_view, eval_view = views.train_batch(torch.arange(2), 0), views.eval_batch(torch.arange(2))
    assert torch.equal(train_view.boxes, eval_view.boxes) and torch.equal(train_view.images, eval_view.images)
    assert train_view.boxes[0].tolist() == [4.0, 0.0, 44.0, 40.0]  # the centred square, not the squashed image


def test_square_images_keep_the_cifar_crops():
    rng, index = CounterRNG(3), torch.arange(500)
    u = rng.uniform(2, index, "padcrop", 2)
    dx, dy = torch.floor(u[:, 0] * 9) - 4, torch.floor(u[:, 1] * 9) - 4
    assert torch.equal(pad_crop_boxes(rng, 2, index, 32, 32, 4), torch.stack([dx, dy, dx + 32, dy + 32], 1))  # as before full images


def test_token_targets_of_a_transposed_record_follow_the_image():
    """A portrait image whose top half is class 0: its record holds it transposed (class 0 on
    the left); the tokens of the whole image must put class 0 on the top rows."""
    dense = torch.zeros(1, 2, 4, 4)
    dense[:, 0, :, :2], dense[:, 1, :, 2:] = 1.0, 1.0  # record orientation: left half class 0
    box = torch.tensor([[0.0, 0.0, 64.0, 64.0]])  # the whole image (square for simplicity)
    tokens, _ = pool_tokens(dense, box, torch.tensor([False]), (64, 64), (4, 4), torch.tensor([True]))
    classes = tokens[0].argmax(-1).view(4, 4)
    assert classes[:2].eq(0).all() and classes[2:].eq(1).all()


@dataclasses.dataclass(frozen=True)
class GeometricOnly(RandAugmentSpec):
    """timm's policy restricted to the ops that move pixels (colour ops would recolour the halves)."""

    @property
    def transforms(self) -> tuple[str, ...]:
        return ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def test_token_targets_follow_randaugment_rotations_shears_and_translations():
    """Half/half views (red left, class 0; blue right, class 1) under geometric RandAugment: every
    token whose pixels are clearly of one half gets that half's label."""
    size, grid, n = 32, (8, 8), 256
    spec = GeometricOnly(num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=1.0)
    images = torch.zeros(n, 3, size, size)
    images[:, 0, :, : size // 2], images[:, 2, :, size // 2 :] = 1.0, 1.0
    targets = torch.zeros(n, 64, 2)
    columns = torch.arange(64) % 8
    targets[:, columns < 4, 0], targets[:, columns >= 4, 1] = 1.0, 1.0
    rng, keys = CounterRNG(5), torch.arange(n)
    warped = rand_augment(images, rng, 1, keys, spec, fill=(0.0, 1.0, 0.0))  # green outside the view
    moved = warp_token_targets(targets, geometric_warps(rng, 1, keys, spec, size), grid, size)
    pixels = warped.view(n, 3, 8, 4, 8, 4).mean(dim=(3, 5)).flatten(2).transpose(1, 2)  # [n, 64, 3] per token
    red, blue = pixels[..., 0] > 0.9, pixels[..., 2] > 0.9
    label = moved.argmax(-1)
    assert red.sum() > 2000 and blue.sum() > 2000  # plenty of tokens checked
    assert (label[red] == 0).all() and (label[blue] == 1).all()
    assert (moved.sum(-1) - 1).abs().max() < 1e-5  # still distributions (uniform where the view shows fill)
    moved_tokens = (label != targets.argmax(-1)).any(dim=1)
    assert moved_tokens.float().mean() > 0.5  # most views were really moved


def test_repeated_augmentation_views_are_distinct_and_replayable():
    rng, n = CounterRNG(0), 10
    order = epoch_order(n, rng, 4, repeats=3)
    base = rng.permutation(4, n, "order")[:4]
    assert order.tolist() == [int(i + r * n) for i in base for r in range(3)][:10]  # 4 images x 3 views, cut to 10
    source_images = torch.randint(0, 256, (n, 16, 16, 3), dtype=torch.uint8)
    from vitdistill.data.source import ImageSource

    source = ImageSource(images=source_images, labels=torch.arange(n) % 2, classes=["a", "b"], name="t", items_hash="x")
    views = Augmenter(
        source,
        AugmentConfig(input_size=8, crop="rrc", repeats=3, mixup_alpha=0.8, cutmix_alpha=1.0),
        0,
        (0.5,) * 3,
        (0.5,) * 3,
        torch.device("cpu"),
    )
    batch = views.train_batch(order[:6], 4)
    assert torch.equal(batch.index, order[:6] % n) and torch.equal(batch.view, order[:6])
    assert batch.index[0] == batch.index[1] == batch.index[2] and len({tuple(b) for b in batch.boxes[:3].tolist()}) == 3  # three views
    again = views.train_batch(order[1:3], 4)  # the same keys on another batch: the same views
    assert torch.equal(again.images, batch.images[1:3]) and torch.equal(again.partner, batch.partner[1:3])
    two_ranks = [train_batches(n, 4, rng, 4, rank, 2, repeats=3) for rank in (0, 1)]
    assert torch.cat([torch.cat([a, b]) for a, b in zip(*two_ranks)]).tolist() == order[:8].tolist()


def test_a_store_with_repeats_replays_the_online_teacher(tmp_path, tiny_teacher):
    common = [*TINY_DEIT, "augment.repeats=3", "augment.mixup_alpha=0.8", "augment.cutmix_alpha=1.0"]
    store = tmp_path / "store"
    write_store(
        load_recipe(
            "demo_student_distilled",
            tiny_run(tmp_path / "u", *common, f"teacher.checkpoint={tiny_teacher}", f"store.path={store}", "store.k=10"),
        )
    )
    assert (store / "epoch_0000.bin").stat().st_size == 3 * 256 * 40  # one record per view key
    online = train(load_recipe("demo_student_distilled", tiny_run(tmp_path / "online", *common, f"teacher.checkpoint={tiny_teacher}")))
    stored = train(
        load_recipe(
            "demo_student_distilled", tiny_run(tmp_path / "stored", *common, f"teacher.checkpoint={tiny_teacher}", f"teacher.store={store}")
        )
    )
    from safetensors.torch import load_file

    a, b = load_file(str(online.output / "model.safetensors")), load_file(str(stored.output / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # hard labels from the store == the online teacher's, every repeated view


def test_a_run_on_full_images_with_repeats_and_randaugment_trains(mixed_sizes, tmp_path):
    data = [
        f"data.root={mixed_sizes}",
        "data.source=imagefolder",
        "data.source_size=16",
        "data.train_limit=null",
        "data.eval_limit=null",
        "optim.batch_size=3",
        "augment.input_size=8",
        "augment.crop=rrc",
        "augment.repeats=3",
        "augment.rand_augment=rand-m9-mstd0.5-inc1",
    ]
    result = train(load_recipe("demo_student", tiny_run(tmp_path / "run", *data, *TINY_DEIT)))
    assert [row["train_steps"] for row in result.history] == [2, 2] and result.history[-1]["eval_top1"] >= 0
    recipe = (result.output / "config.yaml").read_text()
    assert "repeats: 3" in recipe and "max_aspect:" in recipe
