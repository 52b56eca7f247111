"""`vit-import onnx`: an optimum-style directory and plain foreign graphs, stamped, checked and
served; every way of giving labels and preprocessing; the refusals, each in one line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("transformers")
import torch  # noqa: E402
from transformers import AutoModelForImageClassification  # noqa: E402

from model_contract.metadata import ModelMetadata  # noqa: E402
from model_contract.preprocess import PreprocessSpec, preprocess  # noqa: E402
from model_export.importing import PHOTOS, image_files  # noqa: E402
from service.runtime.graph_check import inspect_model  # noqa: E402
from service.runtime.session import softmax  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tests.hf_checkpoints import (  # noqa: E402
    PROBABILITY_TOLERANCE,
    classify_v1,
    classify_v2,
    deit_with_teacher_shortest_edge,
    pipeline_probabilities,
    run_import,
)
from tests.onnx_models import classifier, expected_logits, metadata_for  # noqa: E402
from tests.service_support import served  # noqa: E402

LABELS = ["red", "green", "blue"]


def run_plain(*args: str) -> subprocess.CompletedProcess[str]:
    """`vit-import onnx` of a graph without attention (these classifiers average colours)."""
    return run_import("onnx", *args, "--no-rollout")


def metadata_of(path: Path) -> ModelMetadata:
    return ModelMetadata.from_props({p.key: p.value for p in onnx.load(str(path)).metadata_props})


def optimum_style(folder: Path) -> Path:
    """What `optimum-cli export onnx` leaves: model.onnx (pixel_values -> logits) beside the
    checkpoint's config.json and preprocessor_config.json."""
    checkpoint = deit_with_teacher_shortest_edge(folder / "checkpoint")
    model = AutoModelForImageClassification.from_pretrained(checkpoint.folder).eval()
    exported = folder / "optimum"
    exported.mkdir()
    example = torch.zeros(1, 3, 64, 64)
    torch.onnx.export(
        model,
        (example,),
        str(exported / "model.onnx"),
        input_names=["pixel_values"],
        output_names=["logits"],
        dynamic_axes={"pixel_values": {0: "batch_size"}, "logits": {0: "batch_size"}},
    )
    for name in ("config.json", "preprocessor_config.json"):
        (exported / name).write_text((checkpoint.folder / name).read_text())
    return exported


def test_an_optimum_directory_serves_the_pipelines_numbers(tmp_path: Path) -> None:
    exported = optimum_style(tmp_path)
    output = tmp_path / "served.onnx"
    result = run_import(
        "onnx", str(exported), "-o", str(output), "--calibration-images", str(PHOTOS)
    )
    assert result.returncode == 0, result.stderr
    metadata = metadata_of(output)
    assert metadata.attention_output == "attention_rollout" and metadata.output_name == "logits"
    # Five photos: the 1st, 3rd and 5th fit the Mahalanobis score, the 2nd and 4th set its
    # threshold.
    assert metadata.ood is not None and metadata.ood.score == "mahalanobis"
    assert metadata.ood.calibration_images == 2
    assert metadata.self_test is not None and len(metadata.self_test.images) == 4
    assert metadata.labels == ("left", "right", "up") and metadata.name == "optimum"
    assert (
        metadata.source["importer"] == "vit-import onnx" and metadata.source["model_type"] == "deit"
    )
    files = image_files(PHOTOS)
    expected = pipeline_probabilities(tmp_path / "checkpoint", files, list(metadata.labels))
    with served(output, ROOT) as server:
        v1, _ = classify_v1(server.url, files)
        v2 = classify_v2(server.url, metadata.name, files)
    for answer in (v1, v2):
        assert np.abs(answer - expected).max() <= PROBABILITY_TOLERANCE
        assert (answer.argmax(1) == expected.argmax(1)).all()


@pytest.mark.parametrize("kind", ["txt", "json", "config"])
def test_labels_come_from_a_text_file_a_json_list_or_a_config(tmp_path: Path, kind: str) -> None:
    labels_file = {
        "txt": (tmp_path / "labels.txt", "red\ngreen\n\nblue\n"),
        "json": (tmp_path / "labels.json", json.dumps(LABELS)),
        "config": (
            tmp_path / "config.json",
            json.dumps({"id2label": {"2": "blue", "0": "red", "1": "green"}}),
        ),
    }[kind]
    labels_file[0].write_text(labels_file[1])
    plain = classifier(tmp_path / "plain.onnx")
    output = tmp_path / "stamped.onnx"
    result = run_plain(str(plain), "-o", str(output), "--labels", str(labels_file[0]))
    assert result.returncode == 0, result.stderr
    metadata = metadata_of(output)
    assert metadata.labels == tuple(LABELS) and metadata.name == "plain"
    assert metadata.preprocessing.input_size == 32  # from the graph
    assert metadata.output == "logits" and metadata.version == "1"


def test_flags_set_the_preprocessing_and_the_service_follows_them(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("\n".join(LABELS))
    output = tmp_path / "m.onnx"
    flags = [
        "--labels", str(tmp_path / "labels.txt"),
        "--interpolation", "bicubic",
        "--crop-pct", "0.875",
        "--mean", "0.485", "0.456", "0.406",
        "--std", "0.229", "0.224", "0.225",
        "--name", "colours", "--version", "3",
        "--jpeg-draft",
    ]  # fmt: skip
    result = run_plain(str(classifier(tmp_path / "plain.onnx")), "-o", str(output), *flags)
    assert result.returncode == 0, result.stderr
    metadata = metadata_of(output)
    spec = metadata.preprocessing
    assert (spec.interpolation, spec.crop_pct, spec.jpeg_draft) == ("bicubic", 0.875, True)
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    assert (metadata.name, metadata.version) == ("colours", "3")
    photo = image_files(PHOTOS)[0].read_bytes()
    expected = softmax(expected_logits(preprocess(photo, spec)))
    with served(output, ROOT) as server:
        answer, _ = classify_v1(server.url, [image_files(PHOTOS)[0]])
    np.testing.assert_allclose(answer, expected, atol=1e-6)


def test_the_fix_a_refusal_names_works(tmp_path: Path) -> None:
    wrong = classifier(tmp_path / "m.onnx", size=32, metadata=metadata_for(LABELS, 64))
    refused = run_plain(str(wrong), "-o", str(tmp_path / "x.onnx"))
    assert refused.returncode != 0 and "--input-size 32" in refused.stderr
    fixed = run_plain(str(wrong), "-o", str(wrong), "--input-size", "32")
    assert fixed.returncode == 0, fixed.stderr
    metadata, graph = inspect_model(wrong)
    assert metadata.preprocessing.input_size == 32 and metadata.labels == tuple(LABELS)
    assert graph.input_name == "pixels"


def test_several_outputs_need_a_name_unless_one_is_logits(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("\n".join(LABELS))
    two = classifier(tmp_path / "two.onnx", extra_output=True)
    labels = ["--labels", str(tmp_path / "labels.txt")]
    chosen = run_plain(str(two), "-o", str(tmp_path / "a.onnx"), *labels)
    assert chosen.returncode == 0, chosen.stderr
    assert metadata_of(tmp_path / "a.onnx").output_name == "logits"
    named = run_plain(
        str(two), "-o", str(tmp_path / "b.onnx"), *labels, "--output-name", "features"
    )
    assert named.returncode == 0, named.stderr  # three columns, three labels: it fits
    missing = run_plain(
        str(two), "-o", str(tmp_path / "c.onnx"), *labels, "--output-name", "scores"
    )
    assert missing.returncode != 0 and "names the output 'scores'" in missing.stderr


def test_logits_called_probabilities_are_refused(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("\n".join(LABELS))
    result = run_plain(
        str(classifier(tmp_path / "m.onnx")),
        "-o",
        str(tmp_path / "out.onnx"),
        "--labels",
        str(tmp_path / "labels.txt"),
        "--output-kind",
        "probabilities",
    )
    assert result.returncode != 0 and "do not sum to 1" in result.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_a_fixed_batch_graph_imports_and_runs(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("\n".join(LABELS))
    output = tmp_path / "out.onnx"
    fixed = classifier(tmp_path / "m.onnx", batch=1)
    labels = ["--labels", str(tmp_path / "labels.txt")]
    result = run_plain(str(fixed), "-o", str(output), *labels)
    assert result.returncode == 0, result.stderr
    assert "smoke inference on 5 images" in result.stdout
    assert inspect_model(output)[1].fixed_batch_size == 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "no labels: give --labels"),
        (["--labels", "LABELS", "--resize-size", "16"], "resize_size must be at least input_size"),
    ],
)
def test_what_cannot_be_stamped_is_refused_in_one_line(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    (tmp_path / "labels.txt").write_text("\n".join(LABELS))
    flags = [str(tmp_path / "labels.txt") if f == "LABELS" else f for f in flags]
    result = run_plain(str(classifier(tmp_path / "m.onnx")), "-o", str(tmp_path / "o.onnx"), *flags)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert message in lines[-1] and lines[-1].startswith("vit-import: "), result.stderr


def test_a_symbolic_input_size_needs_the_flag(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("\n".join(LABELS))
    model = classifier(tmp_path / "m.onnx", size="s")
    labels = ["--labels", str(tmp_path / "labels.txt")]
    refused = run_plain(str(model), "-o", str(tmp_path / "o.onnx"), *labels)
    assert refused.returncode != 0 and "give --input-size" in refused.stderr
    given = run_plain(str(model), "-o", str(tmp_path / "o.onnx"), *labels, "--input-size", "40")
    assert given.returncode == 0, given.stderr
    assert metadata_of(tmp_path / "o.onnx").preprocessing == PreprocessSpec(input_size=40)


def test_unreadable_inputs_are_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("\n".join(LABELS))
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("not a graph")
    symbolic = classifier(
        tmp_path / "s.onnx", size="s", classes="c", width_from_input=True, weights_classes=64
    )
    cases = [
        (["onnx", str(not_onnx), "--labels", str(tmp_path / "labels.txt")], "not an ONNX file"),
        (
            ["onnx", str(classifier(tmp_path / "m.onnx")), "--labels", str(tmp_path / "nope")],
            "No such file or directory",
        ),
        (
            [
                *("onnx", str(symbolic), "--labels", str(tmp_path / "labels.txt")),
                *("--input-size", "5", "--no-rollout"),
            ],
            "the graph's output has 5 classes",
        ),
    ]
    for args, message in cases:
        result = run_import(*args, "-o", str(tmp_path / "out.onnx"))
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_a_graph_without_attention_is_refused_unless_told(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("\n".join(LABELS))
    model = classifier(tmp_path / "m.onnx")
    output = tmp_path / "o.onnx"
    refused = run_import(
        "onnx", str(model), "-o", str(output), "--labels", str(tmp_path / "labels.txt")
    )
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode != 0 and len(lines) == 1 and "--no-rollout" in lines[0]
    assert "no Softmax" in lines[0] and not output.exists()
    imported = run_plain(str(model), "-o", str(output), "--labels", str(tmp_path / "labels.txt"))
    assert imported.returncode == 0, imported.stderr
    metadata = metadata_of(output)
    assert metadata.attention_output is None and metadata.ood is None
    assert metadata.self_test is not None and metadata.self_test.tolerance == 1e-3
    assert [o.name for o in onnx.load(str(output)).graph.output] == ["logits"]
