"""`vit-eval --images DIR`: accuracy, recall per class and the confusion matrix on a user's own
labelled folders, with the service's preprocessing."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
import pytest

from model_export import shapes
from model_export.evaluate import Evaluation, evaluate, evaluate_folder, labelled_images, main
from model_runtime.openvino_engine import openvino_missing
from model_runtime.options import IN_PROCESS
from model_runtime.session import ModelSession

SEED, COUNT = 4242, 48


@pytest.fixture(scope="module")
def session(served_model: Path) -> ModelSession:
    return ModelSession(served_model, IN_PROCESS)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same samples `evaluate(seed=SEED, count=COUNT)` classifies, as a folder per label."""
    root = tmp_path_factory.mktemp("labelled")
    for i, sample in enumerate(shapes.samples(SEED, COUNT)):
        folder = root / shapes.LABELS[sample.label]
        folder.mkdir(exist_ok=True)
        suffix = ".jpg" if sample.data[:2] == b"\xff\xd8" else ".png"
        (folder / f"{i:03}{suffix}").write_bytes(sample.data)
    return root


def test_a_folder_per_label_gives_the_datasets_confusion(
    session: ModelSession, folders: Path
) -> None:
    evaluation, skipped = evaluate_folder(session, folders, session.metadata.preprocessing)
    reference = evaluate(session, seed=SEED, count=COUNT)
    assert skipped == [] and evaluation.count == COUNT
    assert np.array_equal(evaluation.confusion, reference.confusion)
    recall = evaluation.recall()
    for i, label in enumerate(shapes.LABELS):
        row = reference.confusion[i]
        if row.sum():
            assert recall[label] == pytest.approx(row[i] / row.sum())


def test_the_confusion_matrix_shows_whole_labels_over_their_columns() -> None:
    labels = ("golden retriever", "golden eagle", "cat")
    confusion = np.array([[12, 3, 0], [1, 1034, 2], [0, 0, 7]])
    lines = Evaluation(labels=labels, confusion=confusion).report().splitlines()
    start = lines.index("confusion (rows: true, columns: predicted)") + 1
    header, rows = lines[start], lines[start + 1 :]
    ends = [header.index(label) + len(label) for label in labels]  # right-aligned over counts
    assert len(rows) == len(labels)
    for label, row, counts in zip(labels, rows, confusion, strict=True):
        assert row.startswith(label)
        assert [int(row[:end].split()[-1]) for end in ends] == list(counts)
    assert len({len(line) for line in (header, *rows)}) == 1


def test_the_command_reports_accuracy_recall_and_skips_broken_files(
    served_model: Path, folders: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = folders / "star" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    try:
        main([str(served_model), "--images", str(folders), "--jpeg-draft", "off"])
    finally:
        broken.unlink()
    out = capsys.readouterr().out
    assert f"skipped {broken}" in out
    assert "accuracy" in out and "recall per class" in out and "confusion" in out


def test_the_first_line_says_which_engine_ran_and_at_which_precision(
    served_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for engine, says in [
        ("onnxruntime", "onnxruntime fp32: the file's precision, fp32"),
        ("openvino", "openvino fp32: an fp32 file always runs at fp32"),
    ]:
        if engine == "openvino" and openvino_missing() is not None:
            says = "onnxruntime fp32:"  # asked for, not installed: the reference runs instead
        main([str(served_model), "--seed", str(SEED), "--count", "8", "--engine", engine])
        first, *rest = capsys.readouterr().out.splitlines()
        assert first.startswith(says) and rest[0].startswith("accuracy"), first


def test_folders_that_are_not_labels_are_refused(served_model: Path, tmp_path: Path) -> None:
    (tmp_path / "kitten").mkdir()
    with pytest.raises(SystemExit, match="kitten not among the model's labels: circle"):
        main([str(served_model), "--images", str(tmp_path)])


def test_hidden_and_empty_folders_are_not_labels(session: ModelSession, tmp_path: Path) -> None:
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / "heart").mkdir()  # a label with no images yet
    (tmp_path / "star").mkdir()
    (tmp_path / "star" / "a.jpg").write_bytes(next(shapes.samples(5, 1)).data)
    evaluation, skipped = evaluate_folder(session, tmp_path, session.metadata.preprocessing)
    assert evaluation.count == 1 and skipped == []


def test_label_folders_match_in_either_unicode_form(tmp_path: Path) -> None:
    """macOS writes "café" as "cafe" + a combining accent; the model's labels are composed."""
    image = next(shapes.samples(5, 1)).data
    for i, name in enumerate(["café", "thé glacé"]):
        folder = tmp_path / unicodedata.normalize("NFD", name)
        folder.mkdir()
        (folder / f"{i}.png").write_bytes(image)
    samples = labelled_images(tmp_path, ("thé glacé", "eau", "café"))
    assert sorted(label for _, label in samples) == [0, 2]


def test_a_wrong_model_or_folder_is_one_line(served_model: Path, tmp_path: Path) -> None:
    not_a_model = tmp_path / "photo.png"
    not_a_model.write_bytes(b"\x89PNG not a model")
    for argv, says in [
        ([str(tmp_path / "nope.onnx"), "--seed", "1"], "nope.onnx: no such model file"),
        ([str(tmp_path), "--seed", "1"], ": no such model file"),
        ([str(not_a_model), "--seed", "1"], "cannot evaluate"),
        ([str(served_model), "--images", str(tmp_path / "nope")], "nope: no such folder"),
    ]:
        with pytest.raises(SystemExit, match=says):
            main(argv)
