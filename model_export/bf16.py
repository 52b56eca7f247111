"""bf16: the gate an FP32 file passes before it is stamped `precision: bf16`, measured on this
machine's CPU (the file as onnxruntime runs it, FP32, against the same file as OpenVINO runs it
in bf16), and how far bf16 moves the outputs the gate does not judge. No torch here."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_contract.ood import in_distribution
from model_contract.outputs import ATTENTION_ROLLOUT, OOD_SCORE, PROBABILITIES
from model_export.evaluate import ENGINES
from model_export.importing import probability_diff, served_logits
from model_runtime.openvino_engine import OPENVINO, cpu_runs_bf16, openvino_missing
from model_runtime.session import ModelSession

# bf16 keeps 8 significant bits (2-3 decimal digits) of float32's 24. A file must keep the FP32
# answer on nearly every image, as int8 must: more flips mean near ties that bf16 decides
# otherwise. The probability bound is about 2.5 times what bf16 moved on the bundled model's
# held-out images (1.7 times the worst of four seeds; tiny transformers ViTs moved far less,
# docs/BF16.md): rounding noise passes, a model bf16 moves further than that stays FP32.
BF16_MIN_TOP1_AGREEMENT = 0.99
BF16_MAX_PROBABILITY_DIFF = 0.05
TINY = np.finfo(np.float64).tiny
"""What a relative difference divides by where the FP32 score is 0."""


class Bf16Unmeasurable(ValueError):
    """The gate cannot be measured on this machine: nothing is stamped bf16 unmeasured."""


def refuse_unmeasurable_bf16() -> None:
    """Bf16Unmeasurable, in one line, unless OpenVINO is installed here and the CPU computes
    bf16: the gate must run the file as a bf16 CPU serves it, never assume it."""
    reason = openvino_missing() or (
        None if cpu_runs_bf16() else "this CPU computes no bf16 (AVX512_BF16 or AMX)"
    )
    if reason is not None:
        raise Bf16Unmeasurable(
            f"--bf16 cannot be checked on this machine ({reason}): run it on a CPU that "
            "computes bf16, as the ones that will serve the file"
        )


def bf16_session(path: Path) -> ModelSession:
    """The file at `path`, stamped bf16, as OpenVINO runs it in bf16; Bf16Unmeasurable where it
    would not run in bf16 here (OpenVINO could not run the graph, say)."""
    refuse_unmeasurable_bf16()
    session = ModelSession(path, ENGINES[OPENVINO])
    if session.precision != "bf16":
        why = "; ".join(session.fallbacks) or session.precision_why
        raise Bf16Unmeasurable(f"the file does not run in bf16 here: {why}")
    return session


@dataclass(frozen=True)
class Bf16Report:
    """The file in bf16 against the same file in FP32, on the same images."""

    images: int
    top1_agree: int
    max_probability_diff: float

    @property
    def top1_agreement(self) -> float:
        return self.top1_agree / self.images

    @property
    def passed(self) -> bool:
        return (
            self.top1_agreement >= BF16_MIN_TOP1_AGREEMENT
            and self.max_probability_diff <= BF16_MAX_PROBABILITY_DIFF
        )

    def line(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        return (
            f"bf16 (OpenVINO) vs fp32 (onnxruntime) on {self.images} images: top-1 equal "
            f"{self.top1_agree}/{self.images} = {self.top1_agreement:.2%} "
            f"(>= {BF16_MIN_TOP1_AGREEMENT:.0%}), max |dprobability| "
            f"{self.max_probability_diff:.2e} (<= {BF16_MAX_PROBABILITY_DIFF:g})  {verdict}"
        )

    def refusal(self) -> str:
        """Why the file is not stamped bf16, in one line."""
        failed = []
        if self.top1_agreement < BF16_MIN_TOP1_AGREEMENT:
            failed.append(
                f"top-1 equal to FP32's on {self.top1_agreement:.2%} of {self.images} images, "
                f"under {BF16_MIN_TOP1_AGREEMENT:.0%}"
            )
        if self.max_probability_diff > BF16_MAX_PROBABILITY_DIFF:
            failed.append(
                f"a probability {self.max_probability_diff:.3g} off FP32's, over "
                f"{BF16_MAX_PROBABILITY_DIFF:g}"
            )
        return f"bf16 moves this model's answers too far ({'; '.join(failed)}): serve it in FP32"


def bf16_gate(fp32_logits: np.ndarray, bf16_logits: np.ndarray) -> Bf16Report:
    """Top-1 agreement and the largest probability difference of the two runs' outputs."""
    return Bf16Report(
        images=len(fp32_logits),
        top1_agree=int((fp32_logits.argmax(axis=1) == bf16_logits.argmax(axis=1)).sum()),
        max_probability_diff=probability_diff(fp32_logits, bf16_logits),
    )


def bf16_gate_on_files(fp32: ModelSession, bf16: ModelSession, files: list[Path]) -> Bf16Report:
    """The gate on the importers' check images, each as the service computes it."""
    spec = fp32.metadata.preprocessing
    return bf16_gate(served_logits(fp32, files, spec), served_logits(bf16, files, spec))


@dataclass(frozen=True)
class OodDrift:
    """How far bf16 moves the out-of-distribution score, whose threshold is the FP32 file's."""

    max_diff: float
    max_relative_diff: float
    """Relative to the FP32 score."""
    flags_changed: int
    """Images whose in-distribution flag bf16 turns the other way."""


@dataclass(frozen=True)
class Drift:
    """How far bf16 moves the outputs the gate does not judge, against the FP32 run."""

    images: int
    max_rollout_diff: float | None
    """None: the file has no attention rollout."""
    ood: OodDrift | None
    """None: the file is not calibrated."""

    def line(self) -> str:
        rollout = (
            "no attention rollout"
            if self.max_rollout_diff is None
            else f"max |drollout| {self.max_rollout_diff:.2e}"
        )
        ood = (
            "no out-of-distribution score"
            if self.ood is None
            else f"ood score max |d| {self.ood.max_diff:.3g} ({self.ood.max_relative_diff:.2%} "
            f"of the score), {self.ood.flags_changed} in-distribution flags changed"
        )
        return f"bf16 vs fp32 on {self.images} images, not gated: {rollout}, {ood}"


def bf16_drift(fp32: ModelSession, bf16: ModelSession, batches: Iterable[np.ndarray]) -> Drift:
    """The rollout and the out-of-distribution score of the two runs on the same batches."""
    runs = [(fp32.infer(batch), bf16.infer(batch)) for batch in batches]

    def joined(name: str) -> tuple[np.ndarray, np.ndarray]:
        return (
            np.concatenate([reference[name] for reference, _ in runs]),
            np.concatenate([moved[name] for _, moved in runs]),
        )

    images = sum(len(reference[PROBABILITIES]) for reference, _ in runs)
    rollout_diff = None
    if fp32.attention_output is not None:
        reference, moved = joined(ATTENTION_ROLLOUT)
        rollout_diff = float(np.abs(reference - moved).max())
    calibration = fp32.metadata.ood
    if calibration is None:
        return Drift(images, rollout_diff, None)
    reference, moved = joined(OOD_SCORE)
    gap = np.abs(reference - moved)
    flipped = in_distribution(reference, calibration.threshold) != in_distribution(
        moved, calibration.threshold
    )
    ood = OodDrift(
        max_diff=float(gap.max()),
        max_relative_diff=float((gap / np.maximum(np.abs(reference), TINY)).max()),
        flags_changed=int(flipped.sum()),
    )
    return Drift(images, rollout_diff, ood)
