"""What the image classifier takes: base64-encoded image files decoded as `prepare` decodes them,
paths read in the user's own process but refused by a served model unless their folder is
allowed, and limits answered before any decoding. A real tiny Keras model saved as the pyfunc a
run registers, real image files, and MLflow's own scoring-server parsing of each JSON form."""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from src.serving import loading, pyfunc_model
from tests import corpus
from tests.test_registered_model import CLASSES, brightness_model
from tests.test_tracking_keys import SIZE


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """The brightness model saved as the registered pyfunc is, and loaded as a user loads it."""
    import mlflow
    from mlflow.models import Model

    folder = tmp_path_factory.mktemp("pyfunc") / "model"
    pyfunc_model.save_model(str(folder), Model(), keras_model=brightness_model(), classes=CLASSES)
    return mlflow.pyfunc.load_model(str(folder))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """A JPEG photo of random pixels larger than the model's input, a dark PNG, a bright one."""
    folder = tmp_path_factory.mktemp("photos")
    return [
        corpus.image(folder / "photo.jpg", side=97, seed=3),
        corpus.image(folder / "dark.png", side=40, mode="L", seed=1),
        corpus.image(folder / "bright.webp", side=33, seed=2),
    ]


@pytest.fixture
def serving(monkeypatch):
    """This process marked as MLflow's scoring server marks the process it serves in; no folder allowed."""
    monkeypatch.setenv(pyfunc_model.SERVING_ENV, "true")
    monkeypatch.delenv(pyfunc_model.ALLOWED_DIRS_ENV, raising=False)
    return monkeypatch


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def probabilities(frame: pd.DataFrame) -> np.ndarray:
    return frame[[f"p_{c}" for c in CLASSES]].to_numpy()


def refusal(classifier, model_input) -> str:
    with pytest.raises(MlflowException) as err:
        classifier.predict(model_input)
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"
    return err.value.message


def test_golden_image_by_path_by_base64_and_by_loading_predict_gives_the_same_probabilities(
    classifier, photos
):
    rows = loading.predict(brightness_model(), CLASSES, photos)
    reference = np.array([row["probabilities"] for row in rows])
    by_path = probabilities(classifier.predict([str(p) for p in photos]))
    encoded = [b64(p) for p in photos]
    by_base64 = probabilities(classifier.predict(pd.DataFrame({"image": encoded})))
    by_dict = probabilities(classifier.predict({"image": np.array(encoded)}))
    by_bytes = probabilities(classifier.predict(pd.DataFrame({"image": [p.read_bytes() for p in photos]})))
    data_url = probabilities(
        classifier.predict(pd.DataFrame({"image": ["data:image/png;base64," + encoded[1]]}))
    )
    _, images, _ = loading.read_images(photos, SIZE)
    by_pixels = probabilities(classifier.predict(images))
    assert [row["class"] for row in rows] == classifier.predict(pd.DataFrame({"image": encoded}))[
        "class"
    ].tolist()
    for probs in (by_path, by_base64, by_dict, by_bytes, by_pixels):
        np.testing.assert_allclose(probs, reference, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(data_url, reference[1:2], rtol=1e-6, atol=1e-7)
    assert classifier.predict(pd.DataFrame({"image": []})).empty


@pytest.mark.parametrize("kind", ["bad base64", "not an image", "truncated JPEG", "not a string", "empty"])
def test_an_encoded_image_that_cannot_be_decoded_is_one_error_naming_its_row(
    classifier, photos, tmp_path, kind
):
    good = b64(photos[0])
    bad = {
        "bad base64": ("not base64 at all!", "image 1: not base64-encoded image bytes"),
        "not an image": (
            base64.b64encode(b"hello, not an image").decode(),
            "image 1: UnidentifiedImageError",
        ),
        "truncated JPEG": (b64(corpus.truncated_jpeg(tmp_path / "cut.jpg")), "image 1: OSError"),
        "not a string": (12, "image 1: expected base64-encoded image bytes (a string), got int"),
        "empty": ("", "image 1: empty"),
    }
    value, message = bad[kind]
    assert message in refusal(classifier, pd.DataFrame({"image": [good, value]}, dtype=object))


def test_limits_are_answered_before_decoding(classifier, tmp_path, monkeypatch):
    # a decompression bomb: small bytes, too many pixels: refused by load_rgb's cap from its header
    bomb = corpus.bomb_png(tmp_path / "bomb.png", side=7000)
    assert "image 0: ImageTooLarge" in refusal(classifier, pd.DataFrame({"image": [b64(bomb)]}))
    # an encoded image over MAX_IMAGE_BYTES, refused from the text's length alone
    monkeypatch.setattr(pyfunc_model, "MAX_IMAGE_BYTES", 1000)
    started = time.perf_counter()
    message = refusal(classifier, pd.DataFrame({"image": ["A" * 10_000_000]}))
    assert "image 0: over 1,000 bytes once decoded" in message and time.perf_counter() - started < 1
    assert "image 0: 2,000 bytes, over 1,000" in refusal(classifier, pd.DataFrame({"image": [bytes(2000)]}))


def test_a_pixel_array_over_the_cap_is_refused_before_it_is_converted(classifier):
    one = [[[0, 0, 0]] * SIZE] * SIZE  # shared rows: a huge nested list costs nothing to build
    huge = [one] * (pyfunc_model.MAX_PIXEL_VALUES // (SIZE * SIZE * 3) + 1)
    started = time.perf_counter()
    message = refusal(classifier, huge)
    assert f"over {pyfunc_model.MAX_PIXEL_VALUES:,}" in message and time.perf_counter() - started < 1
    as_array = np.zeros((len(huge), SIZE, SIZE, 3), np.uint8)
    assert f"over {pyfunc_model.MAX_PIXEL_VALUES:,}" in refusal(classifier, as_array)
    assert classifier.predict(np.asarray(one, np.uint8)[None])["class"].tolist() == [
        "cats"
    ]  # uint8 still works


def test_served_is_what_mlflow_scoring_server_sets(monkeypatch):
    monkeypatch.delenv(pyfunc_model.SERVING_ENV, raising=False)
    monkeypatch.delitem(sys.modules, pyfunc_model.SCORING_SERVER_APP, raising=False)
    assert not pyfunc_model.served()
    monkeypatch.setenv(pyfunc_model.SERVING_ENV, "true")
    assert pyfunc_model.served()
    monkeypatch.delenv(pyfunc_model.SERVING_ENV)
    monkeypatch.setitem(sys.modules, pyfunc_model.SCORING_SERVER_APP, types.ModuleType("app"))
    assert pyfunc_model.served()


def test_a_served_model_refuses_every_path_alike_without_an_allow_list(classifier, photos, tmp_path, serving):
    existing = photos[0]
    missing = tmp_path / "nowhere" / existing.name
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    messages = {}
    for path in (existing, missing, fifo, tmp_path):
        messages[path] = refusal(classifier, [str(path)]).replace(str(path), "<path>")
    assert len(set(messages.values())) == 1
    assert messages[existing] == pyfunc_model.path_refusal("<path>")
    assert refusal(classifier, pd.DataFrame({"path": [str(existing)]})) == pyfunc_model.path_refusal(
        str(existing)
    )
    # base64 and pixels still work
    encoded = classifier.predict(pd.DataFrame({"image": [b64(existing)]}))
    assert encoded["class"].tolist() == [loading.predict(brightness_model(), CLASSES, [existing])[0]["class"]]


def test_a_served_model_reads_only_regular_files_inside_the_allowed_folders(
    classifier, photos, tmp_path, serving
):
    allowed = tmp_path / "allowed"
    inside = corpus.image(allowed / "sub" / "cat.jpg", side=50, seed=5)
    sibling = corpus.image(tmp_path / "allowed2" / "cat.jpg", side=50, seed=5)  # a name prefix only
    outside = photos[0]
    (allowed / "escape.jpg").symlink_to(outside)  # inside by name, outside in fact
    (tmp_path / "alias.jpg").symlink_to(inside)  # outside by name, inside in fact
    os.mkfifo(allowed / "fifo.jpg")
    serving.setenv(pyfunc_model.ALLOWED_DIRS_ENV, os.pathsep.join([str(allowed), str(tmp_path / "other")]))
    reference = np.array(loading.predict(brightness_model(), CLASSES, [inside])[0]["probabilities"])
    for path in (inside, tmp_path / "alias.jpg", allowed / "sub" / ".." / "sub" / "cat.jpg"):
        np.testing.assert_allclose(probabilities(classifier.predict([str(path)]))[0], reference, rtol=1e-6)
    for path in (
        outside,
        sibling,
        allowed / "escape.jpg",
        allowed / "missing.jpg",
        allowed / "sub",
        allowed / ".." / "allowed2" / "cat.jpg",
    ):
        assert refusal(classifier, [str(inside), str(path)]) == pyfunc_model.path_refusal(str(path))
    # a FIFO is never opened: answered at once, not after a writer shows up
    answer: list[str] = []
    thread = threading.Thread(target=lambda: answer.append(refusal(classifier, [str(allowed / "fifo.jpg")])))
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive() and answer == [pyfunc_model.path_refusal(str(allowed / "fifo.jpg"))]


def test_opening_a_fifo_as_an_image_fails_at_once(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OSError, match="not a regular file"):
        loading.open_regular_file(str(tmp_path / "fifo"))


def test_the_user_process_keeps_reading_the_paths_it_is_given(classifier, photos, monkeypatch):
    monkeypatch.delenv(pyfunc_model.SERVING_ENV, raising=False)
    monkeypatch.delenv(pyfunc_model.ALLOWED_DIRS_ENV, raising=False)
    assert len(classifier.predict([str(p) for p in photos])) == len(photos)


@pytest.mark.parametrize(
    "payload",
    [
        lambda images: {"dataframe_records": [{"image": i} for i in images]},
        lambda images: {"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}},
        lambda images: {"inputs": {"image": images}},
        lambda images: {"instances": [{"image": i} for i in images]},
    ],
    ids=["dataframe_records", "dataframe_split", "inputs", "instances"],
)
def test_each_json_form_of_the_scoring_server_reaches_the_model_as_encoded_images(
    classifier, photos, payload
):
    from mlflow.pyfunc import scoring_server

    body = json.dumps(payload([b64(p) for p in photos]))
    answer = scoring_server.invocations(body, "application/json", classifier, None)
    assert answer.status == 200, answer.response
    predictions = json.loads(answer.response)["predictions"]
    reference = loading.predict(brightness_model(), CLASSES, photos)
    assert [row["class"] for row in predictions] == [row["class"] for row in reference]
    np.testing.assert_allclose(
        [[row[f"p_{c}"] for c in CLASSES] for row in predictions],
        [row["probabilities"] for row in reference],
        rtol=1e-6,
        atol=1e-7,
    )
    bad = json.dumps(payload([b64(photos[0]), "%%%"]))
    with pytest.raises(MlflowException, match=re.escape("image 1: not base64-encoded image bytes")):
        scoring_server.invocations(bad, "application/json", classifier, None)
