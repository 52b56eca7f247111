"""Training: `fit`, the one loop and recipe every model here is trained with, and `vit-train`,
which trains the ViT on `shapes` and writes a self-describing checkpoint."""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from model_contract.preprocess import PreprocessSpec
from model_export import shapes
from model_export.checkpoint import Checkpoint, NotACheckpoint
from model_export.dataset import cached_preprocessed
from model_export.export import rebuild
from model_export.outliers import OUTLIER_SEED
from model_export.vit import PRESETS, VisionTransformer, preset

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vit-train", description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--depth", type=int, default=6, help="Override the preset's depth.")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument(
        "--seed", type=int, default=0, help="Seeds the data, the weights and the order."
    )
    parser.add_argument("--train-count", type=int, default=36_000)
    parser.add_argument("--val-count", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument(
        "--max-steps", type=int, default=0, help="Stop after this many steps (0: all)."
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-frac", type=float, default=0.1)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bfloat16 autocast for the forward pass (weights stay float32).",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores).")
    parser.add_argument("--workers", type=int, default=2, help="Processes generating data.")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="Keep generated data here so a rerun skips generating it.",
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="Start from this model's weights (a vit-train checkpoint or a file vit-export "
        "wrote) instead of random ones: its architecture and preprocessing replace --preset, "
        "--depth, --image-size and --patch-size.",
    )
    parser.add_argument(
        "--outliers",
        type=int,
        default=0,
        help="Generated images that are not shapes (model_export/outliers.py) to expose the "
        "model to, half a batch each step: the model learns to be unsure of them, which "
        "sharpens its out-of-distribution score (0: none).",
    )
    parser.add_argument("--outlier-seed", type=int, default=OUTLIER_SEED)
    parser.add_argument(
        "--outlier-weight",
        type=float,
        default=0.5,
        help="Weight of the outliers' cross-entropy to the uniform distribution in the loss.",
    )
    parser.add_argument("--name", default="shapes-vit")
    parser.add_argument("-o", "--output", type=Path, default=Path("checkpoints/shapes-vit.pt"))
    args = parser.parse_args(argv)
    args.command = shlex.join(["vit-train", *(sys.argv[1:] if argv is None else argv)])
    return args


def augment(
    images: torch.Tensor, generator: torch.Generator, *, turns: bool = True
) -> torch.Tensor:
    """Small shifts, and with `turns` flips and quarter turns: every `shapes` class is invariant to
    all three, a handwritten digit only to the shifts (a turned 6 is a 9)."""
    batch = images.shape[0]
    if turns:
        flip = torch.rand(batch, generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        quarter_turns = torch.randint(0, 4, (batch,), generator=generator)
        images = torch.stack(
            [
                torch.rot90(img, int(k), dims=(-2, -1))
                for img, k in zip(images, quarter_turns, strict=True)
            ]
        )
    dx, dy = (int(v) for v in torch.randint(-8, 9, (2,), generator=generator))
    return torch.roll(images, shifts=(dy, dx), dims=(-2, -1))


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Decay matrices only: norms, biases and the token/position embeddings are not shrunk."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, parameter in model.named_parameters():
        is_matrix = parameter.ndim >= 2 and not name.endswith(("cls_token", "pos_embed"))
        (decay if is_matrix else no_decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@torch.no_grad()
def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int
) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start : start + batch_size].float())
        correct += int((logits.argmax(-1) == labels[start : start + batch_size]).sum())
    return correct / len(images)


def uniform_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy from the uniform distribution over the classes to the model's:
    smallest, log(classes), where every class is equally likely."""
    return (torch.logsumexp(logits, dim=1) - logits.mean(dim=1)).mean()


@dataclass(frozen=True)
class Plateau:
    """Train until the training accuracy stops rising instead of for a fixed number of steps.

    After `warmup` steps of linear warm-up the learning rate holds. Every `period` steps the mean
    accuracy of that period's (augmented) training batches is compared with the best so far;
    `patience` periods in a row without a gain of `min_gain` cut the learning rate by `factor`
    (the rule of PyTorch's ReduceLROnPlateau), and the plateau after `cuts` cuts ends training.
    A period with every batch answered right ends it too: there is nothing left to fit.
    `Recipe.steps` stays the cap; a run that reaches it has not converged."""

    period: int = 100
    patience: int = 2
    min_gain: float = 0.005
    factor: float = 0.2
    cuts: int = 2
    warmup: int = 100


class PlateauWatch:
    """A `Plateau`'s state over one run: the learning-rate multiplier and when to stop."""

    def __init__(self, rule: Plateau) -> None:
        self.rule = rule
        self.best = -math.inf
        self.stale = 0
        self.cuts = 0

    def multiplier(self, step: int) -> float:
        if step < self.rule.warmup:
            return (step + 1) / self.rule.warmup
        return float(self.rule.factor**self.cuts)

    def converged(self, period_accuracy: float) -> bool:
        """Record one period's training accuracy; True once training should stop."""
        if period_accuracy >= 1.0:
            return True
        if period_accuracy >= self.best + self.rule.min_gain:
            self.best, self.stale = period_accuracy, 0
            return False
        self.stale += 1
        if self.stale < self.rule.patience:
            return False
        if self.cuts == self.rule.cuts:
            return True
        self.cuts, self.stale = self.cuts + 1, 0
        return False


@dataclass(frozen=True)
class Recipe:
    """How any classifier here is trained: AdamW with weight decay on matrices only, linear
    warm-up then cosine decay, label smoothing, gradient clipping at norm 1, bfloat16 autocast
    for the forward pass (weights stay float32), a fresh shuffle every epoch."""

    steps: int
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_frac: float = 0.1
    label_smoothing: float = 0.1
    bf16: bool = True
    turns: bool = True  # augment with flips and quarter turns as well as shifts
    # Outlier exposure (Hendrycks et al., 2019): with outliers given to `fit`, every step adds
    # batch_size // 2 of them and this weight times their cross-entropy to the uniform
    # distribution, so that the model learns to be unsure of what is not its kind of image.
    outlier_weight: float = 0.5
    # With a plateau rule, `steps` is a cap and the schedule is the rule's, not warm-up + cosine.
    until_plateau: Plateau | None = None


@dataclass(frozen=True)
class Fitted:
    """What a training run ended with."""

    steps: int
    loss: float  # of the last batch
    train_accuracy_ema: float
    # With `Recipe.until_plateau`: whether the rule stopped it before the cap, and the mean
    # training accuracy of its last period.
    converged: bool | None = None
    last_period_accuracy: float | None = None


def fit(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    recipe: Recipe,
    *,
    seed: int,
    outliers: torch.Tensor | None = None,
    after_epoch: Callable[[int], None] | None = None,
    progress: bool = True,
) -> Fitted:
    """Train `model` in place on (N,3,S,S) images for `recipe.steps` steps, or until its
    `until_plateau` rule stops it; `seed` fixes the order and the augmentation. With `outliers`
    (M,3,S,S), each step also exposes the model to a random half batch of them
    (`Recipe.outlier_weight`). `after_epoch(step)` is called after each pass over the data."""
    steps_per_epoch = len(images) // recipe.batch_size
    assert steps_per_epoch > 0, "the training set must hold at least one batch"
    optimizer = torch.optim.AdamW(parameter_groups(model, recipe.weight_decay), lr=recipe.lr)
    watch = PlateauWatch(recipe.until_plateau) if recipe.until_plateau else None
    warmup = max(1, int(recipe.steps * recipe.warmup_frac))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        watch.multiplier if watch else lambda s: warmup_cosine(s, recipe.steps, warmup),
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    generator = torch.Generator().manual_seed(seed)

    step, loss_value, train_accuracy = 0, math.nan, 0.0
    converged, period_correct, last_period_accuracy = False, 0.0, math.nan
    bar = tqdm(
        total=recipe.steps, desc="train", unit="step", dynamic_ncols=True, disable=not progress
    )
    while step < recipe.steps and not converged:
        model.train()
        order = torch.randperm(len(images), generator=generator)
        for batch_start in range(0, steps_per_epoch * recipe.batch_size, recipe.batch_size):
            if step >= recipe.steps or converged:
                break
            index = order[batch_start : batch_start + recipe.batch_size]
            x = augment(images[index].float(), generator, turns=recipe.turns)
            y = labels[index]
            if outliers is not None:
                chosen = torch.randint(0, len(outliers), (len(y) // 2,), generator=generator)
                x = torch.cat([x, augment(outliers[chosen].float(), generator)])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
                all_logits = model(x).float()
            logits = all_logits[: len(y)]
            loss = loss_fn(logits, y)
            if outliers is not None:
                loss = loss + recipe.outlier_weight * uniform_cross_entropy(all_logits[len(y) :])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            loss_value = loss.item()
            batch_accuracy = float((logits.argmax(-1) == y).float().mean())
            train_accuracy = (
                0.9 * train_accuracy + 0.1 * batch_accuracy if step > 1 else batch_accuracy
            )
            if watch is not None:
                period_correct += batch_accuracy
                if step % watch.rule.period == 0:
                    last_period_accuracy = period_correct / watch.rule.period
                    converged = watch.converged(last_period_accuracy)
                    period_correct = 0.0
            bar.set_postfix(
                loss=f"{loss_value:.3f}",
                acc=f"{train_accuracy:.3f}",
                lr=f"{schedule.get_last_lr()[0]:.1e}",
            )
            bar.update()
        if after_epoch is not None:
            after_epoch(step)
    bar.close()
    if watch is None:
        return Fitted(steps=step, loss=loss_value, train_accuracy_ema=train_accuracy)
    return Fitted(
        steps=step,
        loss=loss_value,
        train_accuracy_ema=train_accuracy,
        converged=converged,
        last_period_accuracy=last_period_accuracy,
    )


def initial_model(path: Path) -> tuple[VisionTransformer, PreprocessSpec]:
    """The shapes model to continue training from: a vit-train checkpoint or a file vit-export
    wrote (its weights rebuilt from the graph); NotACheckpoint for anything else."""
    if path.suffix.lower() == ".onnx":
        model, metadata, _ = rebuild(path)
        labels, spec = list(metadata.labels), metadata.preprocessing
    else:
        checkpoint = Checkpoint.load(path)
        model, labels, spec = checkpoint.build_model(), checkpoint.labels, checkpoint.preprocessing
    if labels != list(shapes.LABELS):
        raise NotACheckpoint(f"{path} does not classify the shapes classes {list(shapes.LABELS)}")
    return model, spec


def train(args: argparse.Namespace) -> Checkpoint:
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.init_from is not None:
        model, spec = initial_model(args.init_from)
        config = model.config
    else:
        spec = PreprocessSpec(input_size=args.image_size, jpeg_draft=True)
        config = preset(
            args.preset,
            depth=args.depth,
            image_size=args.image_size,
            patch_size=args.patch_size,
            num_classes=len(shapes.LABELS),
            dropout=args.dropout,
        )
        model = VisionTransformer(config)
    started = time.perf_counter()
    logger.info("generating %d training and %d validation images", args.train_count, args.val_count)
    train_x, train_y = cached_preprocessed(
        args.cache_dir, args.seed, args.train_count, spec, workers=args.workers
    )
    val_x, val_y = cached_preprocessed(
        args.cache_dir,
        args.seed,
        args.val_count,
        spec,
        start=args.train_count,
        workers=args.workers,
    )
    outlier_images = None
    if args.outliers:
        outlier_x, _ = cached_preprocessed(
            args.cache_dir,
            args.outlier_seed,
            args.outliers,
            spec,
            workers=args.workers,
            source="outliers",
        )
        outlier_images = torch.from_numpy(outlier_x)
    images, labels = torch.from_numpy(train_x), torch.from_numpy(train_y)
    val_images, val_labels = torch.from_numpy(val_x), torch.from_numpy(val_y)
    logger.info("data ready in %.0f s", time.perf_counter() - started)

    steps = (len(images) // args.batch_size) * args.epochs
    recipe = Recipe(
        steps=min(steps, args.max_steps) if args.max_steps else steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_frac=args.warmup_frac,
        label_smoothing=args.label_smoothing,
        bf16=args.bf16,
        outlier_weight=args.outlier_weight,
    )
    val_accuracy = 0.0

    def validate(step: int) -> None:
        nonlocal val_accuracy
        val_accuracy = evaluate(model, val_images, val_labels, args.batch_size)
        logger.info("step %d: validation accuracy %.4f", step, val_accuracy)

    fitted = fit(
        model,
        images,
        labels,
        recipe,
        seed=args.seed,
        outliers=outlier_images,
        after_epoch=validate,
    )
    seconds = time.perf_counter() - started
    return Checkpoint(
        state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
        config=config,
        labels=list(shapes.LABELS),
        preprocessing=spec,
        name=args.name,
        dataset={
            "name": "shapes",
            "seed": args.seed,
            "train": [0, args.train_count],
            "validation": [args.train_count, args.train_count + args.val_count],
            **(
                {"outliers": {"seed": args.outlier_seed, "count": args.outliers}}
                if args.outliers
                else {}
            ),
            **({"initialised_from": args.init_from.name} if args.init_from else {}),
        },
        metrics={
            "val_accuracy": val_accuracy,
            "train_accuracy_ema": fitted.train_accuracy_ema,
            "steps": float(fitted.steps),
            "train_seconds": seconds,
        },
        command=args.command,
    )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    try:
        checkpoint = train(args)
    except NotACheckpoint as error:
        sys.exit(f"vit-train: {error}")
    checkpoint.save(args.output)
    logger.info(
        "saved %s (validation accuracy %.4f, %.0f s)",
        args.output,
        checkpoint.metrics["val_accuracy"],
        checkpoint.metrics["train_seconds"],
    )


if __name__ == "__main__":
    main()
