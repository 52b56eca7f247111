"""`vit-import onnx`: an optimum-style directory and plain foreign graphs, stamped, checked and
served; every way of giving labels and preprocessing; the refusals, each in one line."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

pytest.importorskip("transformers")
import torch  # noqa: E402
from transformers import AutoModelForImageClassification  # noqa: E402

from harness.servers import served  # noqa: E402
from model_contract.metadata import ModelMetadata  # noqa: E402
from model_contract.preprocess import PreprocessSpec, preprocess  # noqa: E402
from model_export import importer  # noqa: E402
from model_export.importing import PHOTOS, image_files  # noqa: E402
from model_runtime.graph_check import inspect_model  # noqa: E402
from model_runtime.session import softmax  # noqa: E402
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
        external_data=False,  # optimum keeps weights under 2 GB in the one file
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
    # Five photos: the 5th is held out to measure the flag on, the 1st and 3rd fit the
    # Mahalanobis score, the 2nd and 4th set its threshold.
    assert metadata.ood is not None and metadata.ood.score == "mahalanobis"
    assert metadata.ood.calibration_images == 2 and metadata.ood.held_out_images == 1
    assert metadata.ood.held_out_flagged in (0, 1)
    assert metadata.self_test is not None and len(metadata.self_test.images) == 4
    # Named after the file it serves from, not the directory optimum wrote.
    assert metadata.labels == ("left", "right", "up") and metadata.name == "served"
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


@pytest.mark.parametrize("kind", ["txt", "txt with a BOM", "json", "json with a BOM", "config"])
def test_labels_come_from_a_text_file_a_json_list_or_a_config(tmp_path: Path, kind: str) -> None:
    labels_file = {
        "txt": (tmp_path / "labels.txt", "red\ngreen\n\nblue\n"),
        "json": (tmp_path / "labels.json", json.dumps(LABELS)),
        "config": (
            tmp_path / "config.json",
            json.dumps({"id2label": {"2": "blue", "0": "red", "1": "green"}}),
        ),
    }[kind.removesuffix(" with a BOM")]
    # Windows editors start UTF-8 files with a byte-order mark, which is no part of a label.
    bom = "\ufeff" if kind.endswith("BOM") else ""
    labels_file[0].write_text(bom + labels_file[1], encoding="utf-8")
    plain = classifier(tmp_path / "plain.onnx")
    output = tmp_path / "stamped.onnx"
    result = run_plain(str(plain), "-o", str(output), "--labels", str(labels_file[0]))
    assert result.returncode == 0, result.stderr
    metadata = metadata_of(output)
    assert metadata.labels == tuple(LABELS) and metadata.name == "stamped"  # the output's
    assert metadata.preprocessing.input_size == 32  # from the graph
    assert metadata.output == "logits" and metadata.version == "1"
    # Nothing said how it was trained: the defaults are used, and the import says which.
    assert "warning: no preprocessor_config.json: resize shorter_side, " in result.stdout
    assert "mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5) are defaults" in result.stdout


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
    assert metadata.name == "foreign"  # the name the file carries, not the file's own name


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
    assert metadata_of(tmp_path / "o.onnx").preprocessing == PreprocessSpec(
        input_size=40, alpha_background=None
    )


def test_unreadable_inputs_are_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("\n".join(LABELS))
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("not a graph")
    symbolic = classifier(
        tmp_path / "s.onnx", size="s", classes="c", width_from_input=True, weights_classes=64
    )
    truncated = tmp_path / "photos"
    truncated.mkdir()
    (truncated / "cut.jpg").write_bytes((PHOTOS / "cat.jpg").read_bytes()[:2000])
    cases = [
        (["onnx", str(not_onnx), "--labels", str(tmp_path / "labels.txt")], "not an ONNX file"),
        (
            [
                *("onnx", str(classifier(tmp_path / "c.onnx")), "--no-rollout"),
                *("--labels", str(tmp_path / "labels.txt"), "--check-images", str(truncated)),
            ],
            f"{truncated / 'cut.jpg'} does not decode",
        ),
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
    assert [o.name for o in onnx.load(str(output)).graph.output] == ["logits", "embedding"]


def refusal(*args: str) -> str:
    """`vit-import` run in this process: the one line it exits with."""
    with pytest.raises(SystemExit) as exit_:
        importer.main(list(args))
    line = str(exit_.value.code)
    assert line.startswith("vit-import: ") and "\n" not in line, line
    return line


def exported(module: torch.nn.Module, path: Path, shape: tuple[int, ...] = (1, 3, 32, 32)) -> Path:
    """`module` as torch.onnx.export writes it with a dynamic batch axis."""
    torch.onnx.export(
        module.eval(),
        (torch.rand(*shape),),
        str(path),
        input_names=["pixels"],
        output_names=["logits"],
        dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )
    return path


class MeanColour(torch.nn.Module):
    """Logits from the image's mean colour, in ways a graph can go wrong with a batch."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.weights = torch.nn.Parameter(torch.arange(9.0).reshape(3, 3) - 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "channels_last":
            return x.mean((1, 2)) @ self.weights
        means = x.mean((2, 3))
        if self.how == "one_at_a_time":
            return means.reshape(1, 3) @ self.weights
        if self.how == "mixes_the_batch":
            return (2 * means - means.mean(0, keepdim=True)) @ self.weights
        return (means @ self.weights).softmax(-1)  # probabilities


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("one_at_a_time", "fails on a batch of 2"),
        ("mixes_the_batch", "with another image beside it in the batch"),
        ("probabilities", "say which the output is with --output-kind"),
    ],
)
def test_a_graph_the_service_could_not_batch_or_read_is_refused(
    tmp_path: Path, how: str, message: str
) -> None:
    """One check image would pass each: it is run alone and beside another, and an output that
    sums to 1 needs its kind said."""
    (tmp_path / "labels.txt").write_text("\n".join(LABELS))
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "cat.jpg").write_bytes((PHOTOS / "cat.jpg").read_bytes())
    model = exported(MeanColour(how), tmp_path / "m.onnx")
    flags = ["--labels", str(tmp_path / "labels.txt"), "--no-rollout"]
    output = tmp_path / "o.onnx"
    line = refusal(
        "onnx", str(model), "-o", str(output), *flags, "--check-images", str(tmp_path / "one")
    )
    assert message in line and not output.exists()


def test_probabilities_import_once_their_kind_is_said(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("\n".join(LABELS))
    model = exported(MeanColour("probabilities"), tmp_path / "m.onnx")
    output = tmp_path / "o.onnx"
    result = run_plain(
        str(model), "-o", str(output), "--labels", str(tmp_path / "labels.txt"),
        "--output-kind", "probabilities",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert metadata_of(output).output == "probabilities"
    with served(output, ROOT) as server:  # its warm-up checks the rows are probabilities
        probabilities, _ = classify_v1(server.url, image_files(PHOTOS)[:2])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_a_channels_last_graph_is_refused_for_its_layout(tmp_path: Path) -> None:
    model = exported(MeanColour("channels_last"), tmp_path / "m.onnx", shape=(1, 32, 32, 3))
    (tmp_path / "labels.txt").write_text("\n".join(LABELS))
    line = refusal(
        "onnx", str(model), "-o", str(tmp_path / "o.onnx"), "--labels", str(tmp_path / "labels.txt")
    )
    assert "[?, 32, 32, 3] (channels last)" in line and "[N, 3, S, S]" in line


def test_a_refused_label_count_names_the_import_again(tmp_path: Path) -> None:
    """The fix is the same import from the same source, not a restamp of a file never written."""
    (tmp_path / "labels.txt").write_text("red\ngreen\n")
    model = classifier(tmp_path / "m.onnx")
    output = tmp_path / "o.onnx"
    line = refusal(
        "onnx", str(model), "-o", str(output), "--labels", str(tmp_path / "labels.txt"),
        "--no-rollout",
    )  # fmt: skip
    assert f"`vit-import onnx {model} -o {output} --labels FILE`" in line
    assert "tmp" not in line.replace(str(tmp_path), "")  # no staging file named


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("config.json", b'{"id2label": {"zero": "a", "one": "b"}}', "are not class numbers"),
        ("config.json", b'{"id2label": ["a", "b", "c"]}', "id2label is not an object"),
        ("config.json", b'{"id2label": {"0": "a", "2": "b"}}', "number the classes 0..N-1"),
        ("labels.txt", "caf\u00e9\nb\nc\n".encode("latin-1"), "not UTF-8 text"),
    ],
)
def test_malformed_labels_are_refused_in_one_line(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    (tmp_path / name).write_bytes(content)
    model = classifier(tmp_path / "m.onnx")
    line = refusal(
        "onnx", str(model), "-o", str(tmp_path / "o.onnx"), "--labels", str(tmp_path / name)
    )
    assert message in line


@pytest.mark.parametrize(
    "content",
    [
        ["not", "a", "processor"],
        {"model_type": "vit", "id2label": {"0": "red"}, "hidden_size": 32},  # a model's config
        {"image_processor_type": "NoSuchImageProcessor", "size": 32},
    ],
)
def test_a_preprocessor_config_that_is_none_is_refused_in_one_line(
    tmp_path: Path, content: object
) -> None:
    (tmp_path / "labels.txt").write_text("\n".join(LABELS))
    (tmp_path / "processor.json").write_text(json.dumps(content))
    model = classifier(tmp_path / "m.onnx")
    line = refusal(
        "onnx", str(model), "-o", str(tmp_path / "o.onnx"),
        "--labels", str(tmp_path / "labels.txt"),
        "--preprocessor-config", str(tmp_path / "processor.json"),
    )  # fmt: skip
    assert f"{tmp_path / 'processor.json'}: not" in line and len(line) < 400


def test_transparency_is_dropped_as_pillow_does_unless_a_background_is_given(
    tmp_path: Path,
) -> None:
    """A graph made elsewhere was trained on Pillow's convert('RGB') (torchvision, timm and
    transformers all load images so): that is the default, and a colour is an option."""
    (tmp_path / "labels.txt").write_text("\n".join(LABELS))
    model = classifier(tmp_path / "m.onnx")
    labels = ["--labels", str(tmp_path / "labels.txt")]
    assert run_plain(str(model), "-o", str(tmp_path / "a.onnx"), *labels).returncode == 0
    white = ["--alpha-background", "255,255,255"]
    assert run_plain(str(model), "-o", str(tmp_path / "b.onnx"), *labels, *white).returncode == 0
    dropped = metadata_of(tmp_path / "a.onnx").preprocessing
    composited = metadata_of(tmp_path / "b.onnx").preprocessing
    assert dropped.alpha_background is None and composited.alpha_background == (255, 255, 255)

    pixels = np.zeros((32, 32, 4), np.uint8)
    pixels[..., 0] = 200  # red, fully transparent: dropping alpha keeps it, compositing hides it
    encoded = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(encoded, "PNG")
    plain = np.asarray(Image.fromarray(pixels, "RGBA").convert("RGB"), np.float32) / 255
    expected = ((plain - 0.5) / 0.5).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(preprocess(encoded.getvalue(), dropped), expected, atol=1e-6)
    assert preprocess(encoded.getvalue(), composited).min() == 1.0  # all white
    bad = refusal(
        "onnx", str(model), "-o", str(tmp_path / "c.onnx"), *labels, "--alpha-background", "7"
    )
    assert "neither none nor R,G,B" in bad


def test_weights_kept_beside_the_graph_are_refused_until_exported_as_one_file(
    tmp_path: Path,
) -> None:
    """torch.onnx.export keeps large weights in model.onnx.data unless told otherwise; the
    service loads one file, and the import reads no other."""
    (tmp_path / "labels.txt").write_text("\n".join(LABELS))
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3)).eval()
    model = tmp_path / "m.onnx"

    def export(*, external_data: bool = True) -> None:
        torch.onnx.export(
            module,
            (torch.rand(1, 3, 32, 32),),
            str(model),
            input_names=["pixels"],
            output_names=["logits"],
            dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
            external_data=external_data,
        )

    export()
    assert (tmp_path / "m.onnx.data").exists()
    flags = ["--labels", str(tmp_path / "labels.txt"), "--no-rollout"]
    line = refusal("onnx", str(model), "-o", str(tmp_path / "o.onnx"), *flags)
    assert "keeps its data in another file" in line and "external_data=False" in line
    assert not (tmp_path / "o.onnx").exists()
    export(external_data=False)
    imported = run_plain(str(model), "-o", str(tmp_path / "o.onnx"), *flags[:2])
    assert imported.returncode == 0, imported.stderr
