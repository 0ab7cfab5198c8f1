"""Scoring the emotion model: flip test-time augmentation, on real FER2013 PublicTest faces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.data.fer2013 import load_fer2013
from common.data.preprocess import emotion_tensor
from common.data.types import LabeledImages
from common.evaluation import EmotionSet, emotion_probabilities, emotion_set, evaluate_emotion
from common.metrics import emotion_metrics
from common.models import EmotionNet


@pytest.fixture(scope="module")
def faces() -> LabeledImages:
    public = load_fer2013("PublicTest")
    return public.subset(np.random.default_rng(0).choice(len(public), 200, replace=False))


@pytest.fixture(scope="module")
def net() -> EmotionNet:
    torch.manual_seed(0)  # an untrained network: its verdicts are not mirror-symmetric
    return EmotionNet(width=8).eval()


def test_the_set_holds_the_mirror_image_of_every_face(faces: LabeledImages) -> None:
    data = emotion_set(faces)

    assert data.flipped is not None
    assert torch.allclose(data.flipped, emotion_tensor(faces.images).flip(-1), atol=1e-5)
    assert torch.equal(data.images, emotion_tensor(faces.images))


@torch.no_grad()
def test_a_face_and_its_mirror_image_get_the_same_verdict(
    net: EmotionNet, faces: LabeledImages
) -> None:
    x = emotion_tensor(faces.images)

    assert not torch.equal(net(x).argmax(1), net(x.flip(-1)).argmax(1))  # the net alone differs
    assert torch.allclose(
        emotion_probabilities(net, x, x.flip(-1)), emotion_probabilities(net, x.flip(-1), x)
    )


@torch.no_grad()
def test_verdicts_are_the_mean_probabilities_and_the_single_view_is_reported(
    net: EmotionNet, faces: LabeledImages
) -> None:
    data = emotion_set(faces)
    assert data.flipped is not None
    both = (net(data.images).softmax(1) + net(data.flipped).softmax(1)).argmax(1).numpy()
    single = net(data.images).argmax(1).numpy()
    assert (both != single).any()  # else the test could not tell the two apart

    scores = evaluate_emotion(net, data, batch=64)

    assert scores["accuracy"] == emotion_metrics(both, data.labels)["accuracy"]
    assert scores["macro_f1"] == emotion_metrics(both, data.labels)["macro_f1"]
    assert scores["single_view_accuracy"] == pytest.approx(float(np.mean(single == data.labels)))


def test_a_set_without_mirror_images_is_scored_on_the_single_view(
    net: EmotionNet, faces: LabeledImages
) -> None:
    data = emotion_set(faces)

    scores = evaluate_emotion(net, EmotionSet(data.images, data.labels))

    assert "single_view_accuracy" not in scores
    assert scores["accuracy"] == pytest.approx(evaluate_emotion(net, data)["single_view_accuracy"])
