"""A model file or checkpoint a user downloads is untrusted input: `vit-import` and `vit-eval`
read no file it names, run none of its code, seal what they write, and keep the importing
machine's paths out of the metadata the service shows to anyone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

pytest.importorskip("transformers")
from model_contract.metadata import ModelMetadata  # noqa: E402
from model_export import evaluate  # noqa: E402
from model_export.importing import PHOTOS  # noqa: E402
from model_runtime.model_file import SEAL_KEY, check_model_bytes  # noqa: E402
from model_runtime.options import IN_PROCESS  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tests.hf_checkpoints import (  # noqa: E402
    asking_to_run_its_code,
    pickled_with_code,
    run_import,
)
from tests.hostile_models import external_data  # noqa: E402
from tests.onnx_models import classifier, metadata_for  # noqa: E402

LABELS = ["red", "green", "blue"]
SECRET = b"TOP-SECRET-PASSWORD-hunter2"


def props_of(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.fixture(params=["beside", "up a folder", "through a link"])
def external(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A model in tmp_path/models whose tensor `stolen` keeps its data in the secret file:
    beside it, up a folder, or through a link beside it."""
    (tmp_path / "models").mkdir()
    if request.param == "beside":
        (tmp_path / "models" / "secret.bin").write_bytes(SECRET)
        return external_data(tmp_path / "models" / "m.onnx", "secret.bin", len(SECRET))
    (tmp_path / "secret.bin").write_bytes(SECRET)
    if request.param == "up a folder":
        return external_data(tmp_path / "models" / "m.onnx", "../secret.bin", len(SECRET))
    (tmp_path / "models" / "weights.bin").symlink_to(tmp_path / "secret.bin")
    return external_data(tmp_path / "models" / "m.onnx", "weights.bin", len(SECRET))


def test_a_tensor_kept_in_another_file_is_refused_before_it_is_read(
    external: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out" / "m.onnx"
    result = run_import("onnx", str(external), "-o", str(output), "--no-rollout")
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"vit-import: {external}: the tensor 'stolen'"), line
    assert "keeps its data in another file" in line
    secret = SECRET.decode()
    assert secret not in result.stdout + result.stderr
    assert not (tmp_path / "out").exists()  # neither the file nor the folder made for it


def test_vit_eval_refuses_a_tensor_kept_in_another_file(external: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        evaluate.main([str(external), "--seed", "1", "--count", "4"])
    line = str(exit_.value.code)
    assert line.startswith(f"vit-eval: cannot evaluate {external}: the tensor 'stolen'"), line
    assert "\n" not in line


def test_an_imported_file_is_sealed_and_imports_again(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("\n".join(LABELS))
    model = tmp_path / "m.onnx"
    first = run_import(
        "onnx", str(classifier(tmp_path / "plain.onnx")), "-o", str(model),
        "--labels", str(tmp_path / "labels.txt"), "--no-rollout",
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    limit = IN_PROCESS.max_metadata_bytes
    assert check_model_bytes(model.read_bytes(), max_metadata_bytes=limit).sealed
    again = run_import("onnx", str(model), "-o", str(model), "--version", "2", "--no-rollout")
    assert again.returncode == 0, again.stderr
    assert check_model_bytes(model.read_bytes(), max_metadata_bytes=limit).sealed
    keys = [p.key for p in onnx.load(str(model)).metadata_props]
    assert keys.count(SEAL_KEY) == 1 and keys[0] == SEAL_KEY
    metadata = ModelMetadata.from_props(props_of(model))
    assert metadata.version == "2" and metadata.labels == tuple(LABELS)


def test_a_graph_onnx_checker_refuses_is_refused_in_one_line(tmp_path: Path) -> None:
    """onnxruntime runs a graph whose declared shapes contradict its own (it warns, and merges
    them); onnx's checker, which every written file passes, does not."""
    (tmp_path / "labels.txt").write_text("\n".join(LABELS))
    model = classifier(tmp_path / "m.onnx")
    proto = onnx.load(str(model))
    proto.graph.value_info.append(
        onnx.helper.make_tensor_value_info("means", onnx.TensorProto.FLOAT, ["batch", 5])
    )
    onnx.save(proto, str(model))
    output = tmp_path / "out.onnx"
    result = run_import(
        "onnx", str(model), "-o", str(output), "--labels", str(tmp_path / "labels.txt"),
        "--no-rollout",
    )  # fmt: skip
    assert result.returncode != 0 and not output.exists()
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"vit-import: {model}: onnx's checker refuses the graph"), line
    assert "Traceback" not in result.stderr


def test_no_path_of_the_importing_machine_is_served(tmp_path: Path) -> None:
    """Imported from absolute paths, calibrated on a folder given by its absolute path, and a
    file stamped by an earlier version with a path in its source, imported again."""
    (tmp_path / "labels.txt").write_text("\n".join(LABELS))
    calibration = tmp_path / "calibration"
    shutil.copytree(PHOTOS, calibration)
    model = tmp_path / "exported" / "vit.onnx"
    model.parent.mkdir()
    classifier(model)
    output = tmp_path / "served" / "vit.onnx"
    result = run_import(
        "onnx", str(model), "-o", str(output), "--labels", str(tmp_path / "labels.txt"),
        "--calibration-images", str(calibration), "--no-rollout",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    props = props_of(output)
    assert '"source": "vit.onnx"' in props["source"]
    assert "images under calibration/" in props["ood"]
    for key, value in props.items():
        assert str(tmp_path) not in value and "pytest-of" not in value, (key, value)

    stamped_before = metadata_for(
        LABELS, 32, source={"importer": "vit-import onnx", "source": str(model)}
    )
    old = classifier(tmp_path / "old.onnx", metadata=stamped_before)
    again = run_import("onnx", str(old), "-o", str(output), "--no-rollout")
    assert again.returncode == 0, again.stderr
    assert str(tmp_path) not in props_of(output)["source"]
    assert '"source": "vit.onnx"' in props_of(output)["source"]


def run_import_answering(
    stdin: str | None, *args: str, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """`vit-import`, its standard input closed (None) or answering `stdin` to any question."""
    return subprocess.run(
        [sys.executable, "-m", "model_export.importer", *args],
        cwd=ROOT,
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.mark.parametrize("in_file", ["config.json", "preprocessor_config.json"])
@pytest.mark.parametrize("answer", [None, "y\n"])
def test_a_checkpoint_with_its_own_code_is_refused_without_asking(
    tmp_path: Path, in_file: str, answer: str | None
) -> None:
    marker = tmp_path / "ran"
    checkpoint = asking_to_run_its_code(tmp_path / "evil", marker, in_file=in_file)
    # Where transformers would copy the checkpoint's Python to import it: not the user's cache.
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    output = tmp_path / "m.onnx"
    result = run_import_answering(answer, "hf", str(checkpoint.folder), "-o", str(output), env=env)
    assert not marker.exists()  # its Python never ran
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert line == (
        f"vit-import: {checkpoint.folder / in_file}: its auto_map asks to run Python code "
        "shipped with the checkpoint, and vit-import runs none: import a model whose "
        "architecture and image processor transformers itself ships"
    )
    assert "[y/N]" not in result.stdout + result.stderr and not output.exists()


def test_a_preprocessor_config_with_its_own_code_is_refused_for_an_onnx_import(
    tmp_path: Path,
) -> None:
    processor = tmp_path / "preprocessor_config.json"
    auto_map = {"AutoImageProcessor": "image_processing_evil.EvilProcessor"}
    processor.write_text(
        json.dumps({"image_processor_type": "ViTImageProcessor", "auto_map": auto_map})
    )
    output = tmp_path / "out.onnx"
    result = run_import(
        "onnx", str(classifier(tmp_path / "m.onnx", metadata=metadata_for(LABELS, 32))),
        "-o", str(output), "--preprocessor-config", str(processor), "--no-rollout",
    )  # fmt: skip
    assert result.returncode != 0 and not output.exists()
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"vit-import: {processor}: its auto_map asks to run Python code"), line


def test_pickled_weights_that_would_run_code_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    checkpoint = pickled_with_code(tmp_path / "pickled", marker)
    output = tmp_path / "m.onnx"
    result = run_import("hf", str(checkpoint.folder), "-o", str(output))
    assert not marker.exists()  # never unpickled as a pickle would be
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"vit-import: {checkpoint.folder}: its pickled weights hold objects")
    assert not output.exists()
