"""The training loop every model here goes through: the recipe, the augmentation, the schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from torch import Tensor, nn  # noqa: E402

from model_contract.preprocess import PreprocessSpec  # noqa: E402
from model_export.checkpoint import Checkpoint  # noqa: E402
from model_export.cnn import ResNet, ResNetConfig  # noqa: E402
from model_export.train import (  # noqa: E402
    Plateau,
    PlateauWatch,
    Recipe,
    augment,
    evaluate,
    fit,
    initial_model,
    main,
    uniform_cross_entropy,
    warmup_cosine,
)
from model_export.vit import VisionTransformer, ViTConfig  # noqa: E402


def separable(count: int, size: int) -> tuple[Tensor, Tensor]:
    """Bright images are class 1, dark ones class 0: learnable in a few steps by any model."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (count,), generator=generator)
    noise = 0.1 * torch.randn(count, 3, size, size, generator=generator)
    images = (labels.float() * 2 - 1)[:, None, None, None] * 0.8 + noise
    return images.half(), labels


@pytest.mark.parametrize(
    "model",
    [
        lambda: VisionTransformer(
            ViTConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2, num_classes=2)
        ),
        lambda: ResNet(ResNetConfig(image_size=32, widths=(8, 16, 16, 16), num_classes=2)),
    ],
    ids=["vit", "cnn"],
)
def test_a_few_steps_lower_the_loss_of_either_model(model: Callable[[], nn.Module]) -> None:
    torch.manual_seed(0)
    network = model()
    images, labels = separable(128, 32)
    before = nn.functional.cross_entropy(network(images.float()), labels)
    fitted = fit(
        network,
        images,
        labels,
        Recipe(steps=30, batch_size=32, lr=3e-3, bf16=False),
        seed=0,
        progress=False,
    )
    assert fitted.steps == 30
    assert before.item() == pytest.approx(math.log(2))  # the zero head: every class equally likely
    assert fitted.loss < 0.75 * before.item()
    assert evaluate(network, images, labels, batch_size=64) > 0.9


def test_after_epoch_is_called_after_every_pass_over_the_data() -> None:
    network = VisionTransformer(
        ViTConfig(image_size=32, patch_size=16, width=16, depth=1, heads=2, num_classes=2)
    )
    images, labels = separable(64, 32)
    seen: list[int] = []
    fit(
        network,
        images,
        labels,
        Recipe(steps=5, batch_size=32, bf16=False),
        seed=0,
        after_epoch=seen.append,
        progress=False,
    )
    assert seen == [2, 4, 5]  # two batches an epoch, the last epoch cut short


def test_a_plateau_cuts_the_learning_rate_then_stops_training() -> None:
    watch = PlateauWatch(Plateau(patience=2, min_gain=0.01, factor=0.5, cuts=1, warmup=4))
    assert [watch.multiplier(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert not watch.converged(0.50)
    assert not watch.converged(0.70)
    assert not watch.converged(0.705)  # under the least gain: one stale period
    assert not watch.converged(0.70)  # two: the learning rate is cut
    assert watch.cuts == 1 and watch.multiplier(100) == 0.5
    assert not watch.converged(0.80)  # a gain after the cut starts the count again
    assert not watch.converged(0.80)
    assert watch.converged(0.79)  # the plateau after the last cut ends training


def test_a_period_with_every_batch_right_ends_training_at_once() -> None:
    assert PlateauWatch(Plateau()).converged(1.0)


def test_fit_until_plateau_stops_before_its_cap_and_says_so() -> None:
    torch.manual_seed(0)
    network = VisionTransformer(
        ViTConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2, num_classes=2)
    )
    images, labels = separable(128, 32)
    rule = Plateau(period=4, patience=2, cuts=1, warmup=4)
    recipe = Recipe(steps=400, batch_size=32, lr=3e-3, bf16=False, until_plateau=rule)
    fitted = fit(network, images, labels, recipe, seed=0, progress=False)
    assert fitted.converged is True and fitted.steps < 400 and fitted.steps % 4 == 0
    assert fitted.last_period_accuracy is not None and fitted.last_period_accuracy > 0.9
    capped = fit(network, images, labels, replace(recipe, steps=3), seed=0, progress=False)
    assert capped.converged is False and capped.steps == 3
    fixed = fit(
        network, images, labels, Recipe(steps=2, batch_size=32, bf16=False), seed=0, progress=False
    )
    assert fixed.converged is None  # a fixed budget says nothing about convergence


def test_without_turns_augmentation_only_shifts() -> None:
    images = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    shifted = augment(images, torch.Generator().manual_seed(0), turns=False)
    rows = [
        torch.roll(images, (dy, dx), dims=(-2, -1)) for dy in range(-8, 9) for dx in range(-8, 9)
    ]
    assert any(torch.equal(shifted, candidate) for candidate in rows)
    assert not torch.equal(shifted, images)  # this seed's shift is not zero


def test_with_turns_some_image_is_flipped_or_turned() -> None:
    images = torch.randn(16, 3, 16, 16)
    turned = augment(images, torch.Generator().manual_seed(0))
    shifts = [
        torch.roll(images, (dy, dx), dims=(-2, -1)) for dy in range(-8, 9) for dx in range(-8, 9)
    ]
    assert not any(torch.equal(turned, candidate) for candidate in shifts)


def test_the_schedule_warms_up_linearly_then_decays_to_zero() -> None:
    assert [warmup_cosine(s, 10, 2) for s in (0, 1)] == [0.5, 1.0]
    assert warmup_cosine(2, 10, 2) == 1.0
    assert warmup_cosine(10, 10, 2) == pytest.approx(0.0)


def test_outlier_exposure_makes_the_model_unsure_of_outliers_only() -> None:
    """Outliers are noise of middling brightness: exposed to them, the model keeps its classes and
    answers them with nearly uniform probabilities; trained without, it is sure of one class."""

    def trained(outliers: Tensor | None) -> nn.Module:
        torch.manual_seed(0)
        network = VisionTransformer(
            ViTConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2, num_classes=2)
        )
        fit(
            network,
            images,
            labels,
            Recipe(steps=60, batch_size=32, lr=3e-3, bf16=False, outlier_weight=1.0),
            seed=0,
            outliers=outliers,
            progress=False,
        )
        return network.eval()

    images, labels = separable(128, 32)
    generator = torch.Generator().manual_seed(1)
    noise = (0.6 * torch.randn(64, 3, 32, 32, generator=generator)).half()
    exposed, plain = trained(noise[:32]), trained(None)
    unseen = noise[32:].float()  # outliers of the same kind the training never saw
    with torch.no_grad():
        top_exposed = exposed(unseen).softmax(-1).max(-1).values.mean()
        top_plain = plain(unseen).softmax(-1).max(-1).values.mean()
    assert evaluate(exposed, images, labels, batch_size=64) > 0.9
    assert top_exposed < 0.65 < top_plain


def test_uniform_cross_entropy_is_smallest_for_equal_logits() -> None:
    equal = torch.zeros(2, 5)
    sure = torch.tensor([[9.0, 0, 0, 0, 0], [0, 0, 0, 0, 9.0]])
    assert uniform_cross_entropy(equal).item() == pytest.approx(math.log(5))
    assert uniform_cross_entropy(sure).item() > math.log(5) + 5


def test_training_continues_from_a_checkpoint_or_an_exported_file(
    tiny_checkpoint: Path, tiny_onnx: Path
) -> None:
    expected = Checkpoint.load(tiny_checkpoint).build_model().state_dict()
    for source in (tiny_checkpoint, tiny_onnx):
        model, spec = initial_model(source)
        assert spec == PreprocessSpec(input_size=64, jpeg_draft=True)
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)


def test_init_from_anything_else_is_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=r"^vit-train: .*junk.pt is not a vit-train checkpoint"):
        main(["--init-from", str(junk), "--train-count", "8", "-o", str(tmp_path / "out.pt")])
