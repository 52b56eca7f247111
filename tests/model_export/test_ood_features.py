"""The Mahalanobis score appended to a graph (model_export/ood_features.py) against a numpy
reference, on tiny graphs of each head this project meets and on the bundled model; what it adds
and removes; the calibration's split between fitting and thresholding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from model_contract.ood import SCORE_OUTPUT, threshold_accepting
from model_contract.preprocess import preprocess
from model_export.export import CALIBRATION_SEED
from model_export.ood_features import (
    NoHead,
    Standardised,
    add_energy_to_score,
    add_ood_score,
    combined_scores,
    features_of,
    find_head,
    fit,
    mahalanobis_scores,
    ood_scores_of,
    strip_ood_score,
)
from model_export.shapes import samples
from model_export.stamp import ACCEPT_RATE, calibrate_mahalanobis
from model_runtime.options import IN_PROCESS
from model_runtime.session import ModelSession

SIZE, DIM, CLASSES, TOKENS = 4, 6, 3, 5  # 4 patch tokens (a 2x2 grid) after a class token


def tiny(kind: str) -> onnx.ModelProto:
    """pixels [N, 3, 4, 4] -> tokens [N, 5, 6] -> a linear head on the class token's features:
    `gemm` on the raw token (no normalisation), `layernorm` after a final LayerNormalization,
    `deit` two heads (class and distillation token) averaged, `softmax` a head that ends in
    probabilities."""
    rng = np.random.default_rng(0)
    weights: dict[str, np.ndarray] = {
        "embed": rng.standard_normal((3 * SIZE * SIZE, TOKENS * DIM)).astype(np.float32) / 4,
        "shape": np.array([-1, TOKENS, DIM], np.int64),
        "gamma": np.ones(DIM, np.float32),
        "beta": np.zeros(DIM, np.float32),
        "first": np.array(0, np.int64),
        "second": np.array(1, np.int64),
        "head": rng.standard_normal((CLASSES, DIM)).astype(np.float32),
        "bias": rng.standard_normal(CLASSES).astype(np.float32),
        "head2": rng.standard_normal((DIM, CLASSES)).astype(np.float32),
        "two": np.array(2, np.float32),
    }
    nodes = [
        helper.make_node("Flatten", ["pixels"], ["flat"]),
        helper.make_node("MatMul", ["flat", "embed"], ["embedded"]),
        helper.make_node("Reshape", ["embedded", "shape"], ["tokens"]),  # (N, T, D)
    ]
    tokens = "tokens"
    if kind != "gemm":
        nodes.append(
            helper.make_node("LayerNormalization", ["tokens", "gamma", "beta"], ["normed"])
        )
        tokens = "normed"
    nodes += [
        helper.make_node("Gather", [tokens, "first"], ["cls"], axis=1),  # (N, D)
        helper.make_node("Gemm", ["cls", "head", "bias"], ["head_out"], transB=1),
    ]
    if kind == "deit":
        nodes += [
            helper.make_node("Gather", [tokens, "second"], ["dist"], axis=1),
            helper.make_node("MatMul", ["dist", "head2"], ["dist_out"]),
            helper.make_node("Add", ["head_out", "dist_out"], ["both"]),
            helper.make_node("Div", ["both", "two"], ["logits"]),
        ]
    elif kind == "softmax":
        nodes.append(helper.make_node("Softmax", ["head_out"], ["logits"], axis=1))
    else:
        nodes.append(helper.make_node("Identity", ["head_out"], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, SIZE, SIZE)).astype(np.float32)


def run(proto: onnx.ModelProto, names: list[str], batch: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(v) for v in session.run(names, {"pixels": batch})]


def tokens_of(proto: onnx.ModelProto, batch: np.ndarray) -> np.ndarray:
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.append(helper.make_empty_tensor_value_info("tokens"))
    (tokens,) = run(probe, ["tokens"], batch)
    return tokens.astype(np.float64)


@pytest.mark.parametrize("kind", ["gemm", "layernorm", "deit", "softmax"])
def test_the_graphs_score_is_the_mahalanobis_score_of_the_features(kind: str) -> None:
    proto = tiny(kind)
    plain = proto.SerializeToString()
    head = find_head(proto, "logits", input_size=SIZE)
    fitting, probe = images(300, 1), images(40, 2)
    features, outputs = features_of(proto, head, "logits", [fitting[:128], fitting[128:]])
    gaussians = fit(features, outputs.argmax(axis=1))
    add_ood_score(proto, head, gaussians)
    onnx.checker.check_model(proto, full_check=True)
    before = onnx.ModelProto.FromString(plain)
    (logits_before,) = run(before, ["logits"], probe)
    logits, score = run(proto, ["logits", SCORE_OUTPUT], probe)
    # The features, from the graph's own tokens: the pre-norm patch-token mean where a final
    # LayerNormalization is there, the head's input (both heads' for DeiT) otherwise.
    tokens = tokens_of(before, probe)
    expected_features = {
        "gemm": tokens[:, 0],
        "layernorm": tokens[:, 1:].mean(axis=1),
        "deit": tokens[:, 1:].mean(axis=1),
        "softmax": tokens[:, 1:].mean(axis=1),
    }[kind]
    expected = mahalanobis_scores(expected_features, gaussians)
    assert score.dtype == np.float32 and score.shape == (40,)
    assert np.abs(score - expected).max() <= 1e-4 * np.abs(expected).max()
    assert np.array_equal(logits, logits_before)  # the classification is untouched
    assert [o.name for o in proto.graph.output] == ["logits", SCORE_OUTPUT]
    assert strip_ood_score(proto) and not strip_ood_score(proto)
    assert proto.SerializeToString() == plain


def test_without_a_final_normalisation_deit_concatenates_both_heads_inputs() -> None:
    proto = tiny("deit")
    (norm,) = [n for n in proto.graph.node if n.op_type == "LayerNormalization"]
    proto.graph.node.remove(norm)
    for node in proto.graph.node:
        node.input[:] = ["tokens" if i == "normed" else i for i in node.input]
    head = find_head(proto, "logits", input_size=SIZE)
    assert head.inputs == ("cls", "dist") and head.tokens is None
    features, _ = features_of(proto, head, "logits", [images(8, 3)])
    tokens = tokens_of(proto, images(8, 3))
    np.testing.assert_allclose(features, tokens[:, :2].reshape(8, -1), rtol=1e-6)


def test_a_graph_without_a_linear_head_has_no_score() -> None:
    proto = tiny("gemm")
    proto.graph.node[-1].op_type = "Relu"
    with pytest.raises(NoHead, match="Relu"):
        find_head(proto, "logits", input_size=SIZE)


def test_the_threshold_is_set_on_other_images_than_the_fit() -> None:
    proto = tiny("layernorm")
    fitting, held_out = images(200, 4), images(400, 5)
    truth = np.arange(200) % CLASSES
    ood = calibrate_mahalanobis(
        proto,
        output="logits",
        input_size=SIZE,
        fit_batches=[(fitting[:100], truth[:100]), (fitting[100:], truth[100:])],
        threshold_batches=[held_out[:150], held_out[150:]],
        source="held-out images",
        fit_source="fitting images",
    )
    scores = ood_scores_of(proto, [held_out])
    assert ood.score == "mahalanobis" and ood.calibration_images == 400
    assert ood.threshold == threshold_accepting(scores, ACCEPT_RATE)
    assert (scores >= ood.threshold).mean() == ACCEPT_RATE
    assert ood.calibration_source == (
        "held-out images; class means and covariance fitted on fitting images"
    )
    # The means are of the true classes given, not of the model's predictions.
    head = find_head(tiny("layernorm"), "logits", input_size=SIZE)
    features, _ = features_of(tiny("layernorm"), head, "logits", [fitting])
    means = numpy_helper.to_array(
        next(i for i in proto.graph.initializer if i.name == "/ood_score/mean_norms")
    )
    expected = fit(features, truth)
    whitened = (expected.means - expected.means.mean(axis=0)) @ expected.whitening
    np.testing.assert_allclose(means, (whitened**2).sum(axis=1), rtol=1e-5)
    # Fitted on the threshold images themselves, the fit would accept more of them than 95%.
    fitted_on_them = calibrate_mahalanobis(
        tiny("layernorm"),
        output="logits",
        input_size=SIZE,
        fit_batches=[(held_out, np.arange(400) % CLASSES)],
        threshold_batches=[held_out],
        source="",
        fit_source="",
    )
    assert fitted_on_them.threshold > ood.threshold


def test_the_bundled_models_score_is_recomputed_from_its_features(served_model: Path) -> None:
    proto = onnx.load(str(served_model))
    metadata = ModelSession(served_model, IN_PROCESS).metadata
    assert metadata.ood is not None and metadata.ood.score in ("mahalanobis", "mahalanobis_energy")
    assert str(CALIBRATION_SEED) in metadata.ood.calibration_source
    spec = metadata.preprocessing
    batch = np.concatenate([preprocess(s.data, spec) for s in samples(4242, 6)])
    constants = {
        i.name.rsplit("/", 1)[1]: numpy_helper.to_array(i).astype(np.float64)
        for i in proto.graph.initializer
        if i.name.startswith("/ood_score/")
    }
    logits, score = run_file(served_model, batch, ["logits", SCORE_OUTPUT])
    plain = onnx.ModelProto()
    plain.CopyFrom(proto)
    assert strip_ood_score(plain)
    head = find_head(plain, "logits", input_size=spec.input_size)
    assert head.tokens == "/blocks.5/Add_1_output_0" and head.patch_tokens == 64
    features, plain_logits = features_of(plain, head, "logits", [batch])
    z = (features - constants["centre"]) @ constants["whitening"]
    distances = (z**2).sum(axis=1, keepdims=True) + z @ constants["minus_twice_means"]
    expected = -(distances + constants["mean_norms"]).min(axis=1)
    if metadata.ood.score == "mahalanobis_energy":
        standardised = (
            Standardised(float(constants["m_location"]), float(constants["m_scale"])),
            Standardised(float(constants["e_location"]), float(constants["e_scale"])),
        )
        energy = np.log(np.exp(plain_logits.astype(np.float64)).sum(axis=1))
        expected = combined_scores(expected, energy, standardised)
    assert score.shape == (6,)
    assert np.abs(score - expected).max() <= 1e-4 * np.abs(expected).max()
    assert np.array_equal(logits, plain_logits)
    assert (score >= metadata.ood.threshold).sum() >= 5  # held-out shapes: in distribution


def run_file(path: Path, batch: np.ndarray, names: list[str]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    return [np.asarray(v) for v in session.run(names, {name: batch})]


@pytest.mark.parametrize("count", [1, 2, 3])
def test_a_fit_on_a_few_images_of_distinct_classes_gives_finite_scores(count: int) -> None:
    """A user's calibration folder may hold one image of each class (no spread around any class
    mean) or a single image (no spread at all): the score stays finite and ranks the images
    themselves above a far-away one."""
    features = np.random.default_rng(3).normal(size=(count, DIM))
    gaussians = fit(features, np.arange(count))
    assert np.isfinite(gaussians.whitening).all()
    scores = mahalanobis_scores(np.vstack([features, features[:1] + 100]), gaussians)
    assert np.isfinite(scores).all() and scores[-1] < scores[:-1].min()


def test_the_combined_score_in_the_graph_is_the_smaller_standardised_score() -> None:
    """mahalanobis_energy in the graph against its float64 reference, and removed whole."""
    proto = tiny("layernorm")
    rng = np.random.default_rng(5)
    batch = rng.normal(size=(16, 3, SIZE, SIZE)).astype(np.float32)
    head = find_head(proto, "logits", input_size=SIZE)
    features, logits = features_of(proto, head, "logits", [batch])
    gaussians = fit(features, logits.argmax(axis=1))
    original = onnx.ModelProto()
    original.CopyFrom(proto)
    add_ood_score(proto, head, gaussians)
    mahalanobis = ood_scores_of(proto, [batch])
    energy = np.log(np.exp(logits.astype(np.float64)).sum(axis=1))
    standardised = (Standardised.of(mahalanobis), Standardised.of(energy))
    add_energy_to_score(proto, "logits", standardised)
    onnx.checker.check_model(proto, full_check=True)
    combined = ood_scores_of(proto, [batch])
    expected = combined_scores(mahalanobis, energy, standardised)
    np.testing.assert_allclose(combined, expected, atol=1e-4 * np.abs(expected).max())
    # Each standardised score decides some images: the combination is neither score alone.
    m, e = standardised[0].apply(mahalanobis), standardised[1].apply(energy)
    assert (m < e).any() and (e < m).any()
    assert strip_ood_score(proto)
    assert proto.SerializeToString() == original.SerializeToString()


def test_a_standardised_score_is_zero_at_the_median_and_minus_one_at_the_first_percentile() -> None:
    values = np.random.default_rng(2).normal(40.0, 7.0, 10_001)
    standardised = Standardised.of(values)
    median, low = np.percentile(values, [50, 1])
    np.testing.assert_allclose(standardised.apply(np.array([median, low])), [0.0, -1.0])
    assert Standardised.of(np.full(10, 3.0)).scale == 1.0  # no spread: units left as they are
