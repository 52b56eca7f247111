"""/v1/explain, the attention output on OIP, the out-of-distribution flag and the startup
self-test, on small graphs whose map and scores are known exactly."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from model_contract.metadata import OodCalibration, SelfTest
from model_contract.ood import ood_scores
from model_contract.preprocess import PreprocessSpec, preprocess
from model_runtime.options import IN_PROCESS
from model_runtime.session import ModelSession
from service.app import create_app
from service.http.overlay import UNSEEN_DIMMING
from tests.images import asymmetric, encode, with_orientation
from tests.onnx_models import classifier, expected_attention, metadata_for, unsealed
from tests.service_support import cpu_settings, ready_client, rejections

LABELS = ["red", "green", "blue"]
SIZE = 32
BRIGHT = encode(Image.new("RGB", (40, 40), (250, 240, 230)))
DARK = encode(Image.new("RGB", (40, 40), (10, 20, 200)))


def explained_model(path: Path, **fields: object) -> Path:
    metadata = metadata_for(LABELS, SIZE, attention_output="attention_rollout", **fields)
    return classifier(path, attention=True, metadata=metadata)


def scores(model: Path, *images: bytes) -> np.ndarray:
    session = ModelSession(model, IN_PROCESS)
    spec = session.metadata.preprocessing
    logits = session.logits(np.concatenate([preprocess(image, spec) for image in images]))
    return ood_scores(logits, "logits", "max_softmax")


def calibrated_between(model: Path, inside: bytes, outside: bytes) -> OodCalibration:
    """A threshold halfway between the two images' scores: `inside` clears it."""
    high, low = scores(model, inside, outside)
    assert high > low
    return OodCalibration(
        score="max_softmax",
        threshold=float((high + low) / 2),
        accept_rate=0.95,
        calibration_images=2,
        calibration_source="two test images",
    )


def golden(model: Path, images: list[bytes], shift: float = 0.0) -> SelfTest:
    """The images and the probabilities the model gives them (moved by `shift`)."""
    session = ModelSession(model, IN_PROCESS)
    spec = session.metadata.preprocessing
    expected = session.predict(np.concatenate([preprocess(image, spec) for image in images]))
    return SelfTest(
        images=tuple(base64.b64encode(image).decode() for image in images),
        probabilities=tuple(tuple(float(p) + shift for p in row) for row in expected),
        tolerance=1e-5,
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("explained")
    plain = explained_model(folder / "plain.onnx")
    return explained_model(
        folder / "model.onnx",
        ood=calibrated_between(plain, BRIGHT, DARK),
        self_test=golden(plain, [BRIGHT, DARK]),
    )


@pytest.fixture(scope="module")
def client(model: Path) -> Iterator[TestClient]:
    with ready_client(cpu_settings(model)) as test_client:
        yield test_client


def explain(client: TestClient, data: bytes, **headers: str) -> dict[str, object]:
    response = client.post("/v1/explain", files={"file": ("photo.png", data)}, headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def only_prediction(body: dict[str, object]) -> dict[str, object]:
    predictions = body["predictions"]
    assert isinstance(predictions, list) and len(predictions) == 1
    prediction: dict[str, object] = predictions[0]
    return prediction


def test_explain_gives_the_rollout_grid_and_the_box_the_model_saw(client: TestClient) -> None:
    photo = encode(asymmetric((96, 64)))
    prediction = only_prediction(explain(client, photo))
    attention = prediction["attention"]
    assert isinstance(attention, dict)
    expected = expected_attention(preprocess(photo, PreprocessSpec(input_size=SIZE)))[0]
    np.testing.assert_allclose(np.array(attention["grid"]), expected, atol=1e-5)
    # The shorter side (64) is resized to 32 and the centre square cropped: x 16..80.
    assert attention["box"] == [16.0, 0.0, 80.0, 64.0]
    assert attention["image_size"] == [96, 64]
    classified = client.post("/v1/classify", files={"file": ("photo.png", photo)}).json()
    assert prediction["top"] == classified["predictions"][0]["top"]


def test_the_box_is_in_the_upright_original_whatever_the_exif_orientation(
    client: TestClient,
) -> None:
    upright = asymmetric((96, 64))
    for orientation in (6, 8, 3):
        attention = only_prediction(explain(client, with_orientation(upright, orientation)))[
            "attention"
        ]
        assert isinstance(attention, dict)
        assert attention["image_size"] == [96, 64]
        assert attention["box"] == [16.0, 0.0, 80.0, 64.0]


def draft_decoding_model(tmp_path: Path) -> Path:
    """A model with attention whose JPEGs are decoded reduced, as the bundled model's are."""
    spec = PreprocessSpec(input_size=SIZE, jpeg_draft=True)
    return classifier(
        tmp_path / "m.onnx",
        attention=True,
        metadata=metadata_for(
            LABELS, SIZE, preprocessing=spec, attention_output="attention_rollout"
        ),
    )


def test_a_draft_decoded_jpeg_gets_its_box_in_the_original_pixels(tmp_path: Path) -> None:
    model = draft_decoding_model(tmp_path)
    photo = encode(asymmetric((640, 480)), "JPEG", quality=90)
    with ready_client(cpu_settings(model)) as client:
        attention = only_prediction(explain(client, photo))["attention"]
    assert isinstance(attention, dict)
    assert attention["image_size"] == [640, 480]
    assert attention["box"] == [80.0, 0.0, 560.0, 480.0]


def test_a_draft_decoded_jpeg_is_drawn_at_its_own_size_with_its_detail(tmp_path: Path) -> None:
    model = draft_decoding_model(tmp_path)
    photo = asymmetric((1000, 700))
    for x in range(0, 144, 8):  # stripes finer than the model's draft (1/8) keeps, left of the box
        photo.paste((0, 0, 0), (x, 300, x + 4, 700))
    data = encode(photo, "JPEG", quality=95)
    with ready_client(cpu_settings(model)) as client:
        response = client.post(
            "/v1/explain", files={"file": ("big.jpg", data)}, headers={"accept": "image/png"}
        )
    assert response.status_code == 200, response.text
    overlay = Image.open(io.BytesIO(response.content))
    assert overlay.size == (512, 358)  # the photo's own size, bounded; not its draft's 125x88
    whole = Image.open(io.BytesIO(data)).convert("RGB")
    whole.thumbnail((512, 512), Image.Resampling.BILINEAR)
    # Left of the box (x < 150 of 1000, 76 of 512) the photo is only dimmed, stripes and all.
    seen = np.asarray(overlay, dtype=np.float64)[160:, :72]
    expected = np.asarray(whole, dtype=np.float64)[160:, :72] * UNSEEN_DIMMING
    assert np.abs(seen - expected).mean() < 2
    assert seen.mean(axis=(0, 2)).std() > 10


def test_explain_as_png_is_the_upright_photo_with_the_map_bounded_in_size(
    client: TestClient,
) -> None:
    big = asymmetric((1200, 800))
    response = client.post(
        "/v1/explain",
        files={"file": ("big.png", with_orientation(big, 6))},
        headers={"accept": "image/png"},
    )
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    overlay = Image.open(io.BytesIO(response.content))
    assert overlay.format == "PNG" and overlay.mode == "RGB"
    assert overlay.size == (512, 341)  # the upright photo's 3:2, its longest side 512
    shrunk = np.asarray(big.resize(overlay.size), dtype=np.float64)
    drawn = np.asarray(overlay, dtype=np.float64)
    # Left of the box (what the crop cut away) is dimmed; inside, the photo shows through.
    assert drawn[:, :60].mean() < 0.6 * shrunk[:, :60].mean()
    assert abs(drawn[:, 200:300].mean() - shrunk[:, 200:300].mean()) < 0.5 * shrunk.mean()
    # Inside the box the heat map is drawn: where it is hottest, 60% of the colour is the
    # ramp's (white at the peak), so those pixels move far from the photo's.
    assert np.abs(drawn[:, 100:400] - shrunk[:, 100:400]).max() > 50
    assert response.headers["x-top-label"] in LABELS
    assert LABELS[int(response.headers["x-top-index"])] == response.headers["x-top-label"]


@pytest.mark.parametrize("label", ["猫 cat", "café", "line\r\nX-Injected: 1", "100% sure"])
def test_a_png_answer_percent_encodes_a_label_no_header_can_hold(
    tmp_path: Path, label: str
) -> None:
    labels = [label, label + " too", "plain"]
    metadata = metadata_for(labels, SIZE, attention_output="attention_rollout")
    model = classifier(tmp_path / "m.onnx", attention=True, metadata=metadata)
    with ready_client(cpu_settings(model)) as client:
        response = client.post(
            "/v1/explain", files={"file": ("a.png", BRIGHT)}, headers={"accept": "image/png"}
        )
    assert response.status_code == 200, response.text
    assert "x-injected" not in response.headers
    top = int(response.headers["x-top-index"])
    assert unquote(response.headers["x-top-label"]) == labels[top]
    assert response.headers["x-top-label"].isascii()


def decoded_count(client: TestClient) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "vit_stage_duration_seconds_count" and (
                sample.labels.get("stage") == "decode_preprocess"
            ):
                return sample.value
    return 0.0


def test_a_png_answer_takes_one_file_and_refuses_more_before_decoding(
    client: TestClient,
) -> None:
    before = decoded_count(client)
    files = [("file", ("a.png", BRIGHT)), ("file", ("b.png", DARK))]
    response = client.post("/v1/explain", files=files, headers={"accept": "image/png"})
    assert response.status_code == 400 and response.json()["type"] == "invalid_request"
    assert decoded_count(client) == before
    one = client.post("/v1/explain", files={"file": ("a.png", BRIGHT)})  # counted when decoded
    assert one.status_code == 200 and decoded_count(client) == before + 1


@pytest.mark.parametrize(
    ("accept", "answer"),
    [
        ("image/png;q=0, application/json", "application/json"),
        ("IMAGE/PNG", "image/png"),
        ("image/*", "image/png"),
        ("*/*", "application/json"),
        ("application/json;q=0.5, image/png", "image/png"),
        ("image/png, application/json", "application/json"),
        ("text/html, */*;q=0.1", "application/json"),
    ],
)
def test_the_accept_header_chooses_json_or_png_by_q(
    client: TestClient, accept: str, answer: str
) -> None:
    response = client.post(
        "/v1/explain", files={"file": ("a.png", BRIGHT)}, headers={"accept": accept}
    )
    assert response.status_code == 200 and response.headers["content-type"] == answer


@pytest.mark.parametrize("accept", ["image/jpeg", "image/png;q=0", "*/*;q=0, text/html"])
def test_an_accept_header_taking_neither_json_nor_png_is_a_406_before_decoding(
    client: TestClient, accept: str
) -> None:
    decoded, refused = decoded_count(client), rejections(client, "not_acceptable")
    response = client.post(
        "/v1/explain", files={"file": ("a.png", BRIGHT)}, headers={"accept": accept}
    )
    assert response.status_code == 406
    body = response.json()
    assert body["type"] == "not_acceptable"
    assert "application/json" in body["error"] and "image/png" in body["error"]
    assert rejections(client, "not_acceptable") == refused + 1
    assert decoded_count(client) == decoded
    explain_doc = client.get("/openapi.json").json()["paths"]["/v1/explain"]["post"]
    assert "not_acceptable" in explain_doc["responses"]["406"]["description"]


def test_explain_of_a_model_without_a_rollout_is_a_400_saying_so(tmp_path: Path) -> None:
    model = classifier(tmp_path / "m.onnx", metadata=metadata_for(LABELS, SIZE))
    with ready_client(cpu_settings(model)) as client:
        response = client.post("/v1/explain", files={"file": ("a.png", BRIGHT)})
        assert response.status_code == 400
        assert response.json()["type"] == "no_attention_output"
        assert "attention" in response.json()["error"]
        assert client.get("/v1/models").json()["models"][0]["outputs"] == ["probabilities"]


def test_the_rollout_is_an_oip_output_asked_for_by_name(client: TestClient, model: Path) -> None:
    tensor = np.concatenate(
        [preprocess(image, PreprocessSpec(input_size=SIZE)) for image in (BRIGHT, DARK)]
    )
    inputs = [
        {
            "name": "pixels",
            "datatype": "FP32",
            "shape": list(tensor.shape),
            "data": tensor.ravel().tolist(),
        }
    ]
    url = "/v2/models/foreign/infer"
    asked = {"inputs": inputs, "outputs": [{"name": "attention_rollout"}, {"name": "ood_score"}]}
    outputs = client.post(url, json=asked).json()["outputs"]
    assert [o["name"] for o in outputs] == ["attention_rollout", "ood_score"]
    assert outputs[0]["shape"] == [2, 2, 2] and outputs[1]["shape"] == [2]
    np.testing.assert_allclose(outputs[1]["data"], scores(model, BRIGHT, DARK), rtol=1e-6)
    np.testing.assert_allclose(
        np.array(outputs[0]["data"]).reshape(2, 2, 2), expected_attention(tensor), atol=1e-5
    )
    plain = client.post(url, json={"inputs": inputs}).json()["outputs"]
    assert [o["name"] for o in plain] == ["probabilities"]
    unknown = client.post(url, json={"inputs": inputs, "outputs": [{"name": "features"}]})
    assert unknown.status_code == 400 and "attention_rollout" in unknown.json()["error"]
    metadata = client.get("/v2/models/foreign").json()
    assert metadata["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
        {"name": "attention_rollout", "datatype": "FP32", "shape": [-1, 2, 2]},
        {"name": "ood_score", "datatype": "FP32", "shape": [-1]},
    ]
    for output in outputs:  # what infer answered has the listed datatype and shape
        (listed,) = [o for o in metadata["outputs"] if o["name"] == output["name"]]
        assert output["datatype"] == listed["datatype"]
        assert len(output["shape"]) == len(listed["shape"])
        assert all(n in (-1, m) for n, m in zip(listed["shape"], output["shape"], strict=True))


def flagged_count(client: TestClient) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "vit_out_of_distribution_images_total":
                return sample.value
    return 0.0


def test_each_prediction_says_whether_the_image_is_like_the_training_images(
    client: TestClient, model: Path
) -> None:
    before = flagged_count(client)
    files = [("file", ("bright.png", BRIGHT)), ("file", ("dark.png", DARK))]
    predictions = client.post("/v1/classify", files=files).json()["predictions"]
    calibration = ModelSession(model, IN_PROCESS).metadata.ood
    assert calibration is not None
    expected = scores(model, BRIGHT, DARK)
    assert [p["in_distribution"] for p in predictions] == [True, False]
    # To float32 rounding: under VIT_ENGINE=auto either engine may have served the call.
    np.testing.assert_allclose([p["ood_score"] for p in predictions], expected, rtol=1e-6)
    assert flagged_count(client) == before + 1
    listed = client.get("/v1/models").json()["models"][0]
    assert listed["ood"]["threshold"] == calibration.threshold
    assert listed["outputs"] == ["probabilities", "attention_rollout", "ood_score"]


def test_an_uncalibrated_model_says_nothing_of_distribution(tmp_path: Path) -> None:
    model = explained_model(tmp_path / "m.onnx")
    with ready_client(cpu_settings(model)) as client:
        prediction = client.post("/v1/classify", files={"file": ("a.png", BRIGHT)}).json()[
            "predictions"
        ][0]
        assert "in_distribution" not in prediction and "ood_score" not in prediction
        listed = client.get("/v1/models").json()["models"][0]
        assert listed["ood"] is None
        assert listed["self_test"]["status"] == "none"
        metadata = client.get("/v2/models/foreign").json()
        assert [o["name"] for o in metadata["outputs"]] == ["probabilities", "attention_rollout"]
        assert "vit_model_self_test_passed{" not in client.get("/metrics").text


def test_a_good_model_passes_its_self_test(client: TestClient) -> None:
    self_test = client.get("/v1/models").json()["models"][0]["self_test"]
    assert self_test["status"] == "passed" and "2 golden images" in self_test["detail"]
    text = client.get("/metrics").text
    assert 'vit_model_self_test_passed{model="foreign",version="1"} 1.0' in text


def test_a_model_whose_numbers_moved_never_becomes_ready_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plain = explained_model(tmp_path / "plain.onnx")
    tampered = explained_model(
        tmp_path / "tampered.onnx", self_test=golden(plain, [BRIGHT, DARK], shift=1e-3)
    )
    with TestClient(create_app(cpu_settings(tampered))) as client:
        deadline = time.monotonic() + 30
        while (status := client.get("/v1/models").json()["models"]) == [] or status[0]["self_test"][
            "status"
        ] != "failed":
            assert time.monotonic() < deadline, status
            time.sleep(0.02)
        assert "differs by 1.00e-03" in status[0]["self_test"]["detail"]
        assert client.get("/v2/health/ready").status_code == 503
        refused = client.post("/v1/classify", files={"file": ("a.png", BRIGHT)})
        assert refused.status_code == 503 and "self-test" in refused.json()["error"]
        assert client.get("/v2/health/live").status_code == 200
        text = client.get("/metrics").text
        assert 'vit_model_self_test_passed{model="foreign",version="1"} 0.0' in text
    assert any("self-test failed" in record.getMessage() for record in caplog.records)


def failed_self_test(model: Path, **settings: object) -> str:
    """The detail of `model`'s self-test, which must fail, once the server reports it."""
    with TestClient(create_app(cpu_settings(model, **settings))) as client:
        deadline = time.monotonic() + 10
        while (status := client.get("/v1/models").json()["models"]) == [] or status[0]["self_test"][
            "status"
        ] == "pending":
            assert time.monotonic() < deadline, status
            time.sleep(0.02)
        assert status[0]["self_test"]["status"] == "failed"
        assert client.get("/v2/health/ready").status_code == 503
        detail: str = status[0]["self_test"]["detail"]
        return detail


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_an_expectation_that_is_not_a_number_fails_naming_its_image(
    tmp_path: Path, value: float
) -> None:
    plain = explained_model(tmp_path / "plain.onnx")
    good = golden(plain, [BRIGHT, DARK, BRIGHT])
    broken = good.model_copy(
        update={"probabilities": (good.probabilities[0], (0.5, value, 0.5), good.probabilities[2])}
    )
    detail = failed_self_test(explained_model(tmp_path / "m.onnx", self_test=broken))
    assert detail.startswith("golden image self_test.images[1]: ")
    assert f"self_test.probabilities[1] holds {value}" in detail
    assert "model file is broken" in detail and "provider" not in detail


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        (base64.b64encode(b"not an image").decode(), "not an image in an accepted format"),
        ("not*base64", "not base64"),
        (base64.b64encode(BRIGHT[:60]).decode(), "cannot decode the image"),
    ],
    ids=["not an image", "not base64", "truncated"],
)
def test_a_golden_image_that_does_not_decode_fails_naming_it(
    tmp_path: Path, image: str, reason: str
) -> None:
    plain = explained_model(tmp_path / "plain.onnx")
    good = golden(plain, [BRIGHT, DARK])
    broken = good.model_copy(update={"images": (good.images[0], image)})
    detail = failed_self_test(explained_model(tmp_path / "m.onnx", self_test=broken))
    assert detail.startswith("golden image self_test.images[1] does not decode (")
    assert reason in detail and "model file is broken" in detail


def test_a_golden_image_over_the_servers_pixel_bound_fails_naming_it(tmp_path: Path) -> None:
    plain = explained_model(tmp_path / "plain.onnx")
    model = explained_model(tmp_path / "m.onnx", self_test=golden(plain, [BRIGHT, DARK]))
    detail = failed_self_test(model, max_pixels=40 * 40 - 1)
    assert detail.startswith("golden image self_test.images[0] does not decode (")
    assert "pixels" in detail


def test_an_infinite_tolerance_is_refused_as_it_would_pass_anything(tmp_path: Path) -> None:
    good = golden(explained_model(tmp_path / "plain.onnx"), [BRIGHT])
    with pytest.raises(ValueError, match="tolerance"):
        SelfTest.model_validate({**good.model_dump(), "tolerance": float("inf")})


def test_the_bundled_model_with_perturbed_weights_never_becomes_ready(
    served_model: Path, tmp_path: Path
) -> None:
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(served_model))
    (head,) = [t for t in proto.graph.initializer if t.name == "head.weight"]
    weights = numpy_helper.to_array(head)
    head.CopyFrom(numpy_helper.from_array(weights * np.float32(0.5), head.name))
    perturbed = tmp_path / "perturbed.onnx"
    onnx.save(unsealed(proto), str(perturbed))  # sealed, the change would be refused at once
    with TestClient(create_app(cpu_settings(perturbed))) as client:
        deadline = time.monotonic() + 60
        while (models := client.get("/v1/models").json()["models"]) == [] or models[0]["self_test"][
            "status"
        ] in ("pending",):
            assert time.monotonic() < deadline, models
            time.sleep(0.05)
        assert models[0]["self_test"]["status"] == "failed"
        assert client.get("/v2/health/ready").status_code == 503


@pytest.mark.parametrize("io_binding", [False, True])
def test_a_score_the_graph_computes_is_read_from_its_output(
    tmp_path: Path, io_binding: bool
) -> None:
    spec = PreprocessSpec(input_size=SIZE)
    bright, dark = (float(preprocess(image, spec).mean()) for image in (BRIGHT, DARK))
    calibration = OodCalibration(
        score="mahalanobis",
        threshold=(bright + dark) / 2,
        accept_rate=0.95,
        calibration_images=2,
        calibration_source="two test images",
    )
    model = classifier(
        tmp_path / "m.onnx", ood_score=True, metadata=metadata_for(LABELS, SIZE, ood=calibration)
    )
    with ready_client(cpu_settings(model, io_binding=io_binding)) as client:
        files = [("file", ("bright.png", BRIGHT)), ("file", ("dark.png", DARK))]
        predictions = client.post("/v1/classify", files=files).json()["predictions"]
        assert client.get("/v1/models").json()["models"][0]["runtime"]["io_binding"] == (
            "on" if io_binding else "off"
        )
    np.testing.assert_allclose([p["ood_score"] for p in predictions], [bright, dark], atol=1e-5)
    assert [p["in_distribution"] for p in predictions] == [True, False]


def test_a_graph_score_the_graph_lacks_is_refused_at_load(tmp_path: Path) -> None:
    from model_runtime.graph_check import ModelMismatch

    calibration = OodCalibration(
        score="mahalanobis",
        threshold=0.0,
        accept_rate=0.95,
        calibration_images=2,
        calibration_source="two test images",
    )
    model = classifier(tmp_path / "m.onnx", metadata=metadata_for(LABELS, SIZE, ood=calibration))
    with pytest.raises(ModelMismatch, match="no output 'ood_score'"):
        ModelSession(model, IN_PROCESS)
