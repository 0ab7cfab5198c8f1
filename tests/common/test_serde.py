"""Only the shared backbones travel; the local identity head never appears in a record. Arrays are
encoded and decoded exactly as Flower does, only faster."""

import hashlib

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from common.models import CosineHead, EmotionNet, FaceEmbedder
from common.serde import arrays_digest, decode, encode, from_arrays, manifest, to_arrays


def test_round_trip_is_exact() -> None:
    face, emotion = FaceEmbedder(), EmotionNet()
    face2, emotion2 = FaceEmbedder(), EmotionNet()
    from_arrays(to_arrays(face, emotion), face2, emotion2)
    for a, b in zip(face.state_dict().values(), face2.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_records_carry_only_face_and_emotion_keys() -> None:
    keys = list(to_arrays(FaceEmbedder(), EmotionNet()).keys())
    assert keys and all(k.startswith(("face.", "emotion.")) for k in keys)
    head_shape = tuple(CosineHead(50).weight.shape)
    assert head_shape not in manifest(FaceEmbedder(), EmotionNet()).values()


def test_unexpected_keys_are_rejected() -> None:
    arrays = to_arrays(FaceEmbedder(), EmotionNet())
    state = arrays.to_torch_state_dict()
    state["head.weight"] = torch.zeros(3, 128)
    with pytest.raises(ValueError, match="unexpected keys"):
        from_arrays(ArrayRecord(torch_state_dict=state), FaceEmbedder(), EmotionNet())


def test_digest_changes_with_any_weight() -> None:
    face, emotion = FaceEmbedder(), EmotionNet()
    before = arrays_digest(to_arrays(face, emotion))
    with torch.no_grad():
        emotion.classifier.bias[0] += 1e-3
    assert arrays_digest(to_arrays(face, emotion)) != before


# --- the .npy fast paths: always what Flower's own Array(ndarray) / Array.numpy() give ---------------
ODD_ARRAYS = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.array(2.5),  # 0-d
    np.zeros((0, 3)),  # empty
    np.arange(5, dtype=">f4"),  # big-endian
    np.asfortranarray(np.arange(6.0).reshape(2, 3)),  # Fortran order: np.save marks it
    np.arange(16.0).reshape(4, 4)[:, ::2],  # not contiguous
    np.array([True, False]),
    np.zeros(3, dtype=[("a", "<i4")]),  # structured
    np.ones((2, 2), dtype=np.float16),
    np.random.default_rng(0).standard_normal((64, 32, 3, 3)).astype(np.float32),
]


@pytest.mark.parametrize("value", ODD_ARRAYS, ids=lambda a: f"{a.dtype}{a.shape}")
def test_encode_writes_the_bytes_flower_writes(value: np.ndarray) -> None:
    ours, flowers = encode(value), Array(value)
    assert (ours.dtype, tuple(ours.shape), ours.stype, ours.data) == (
        flowers.dtype,
        tuple(flowers.shape),
        flowers.stype,
        flowers.data,
    )


@pytest.mark.parametrize("value", ODD_ARRAYS, ids=lambda a: f"{a.dtype}{a.shape}")
def test_decode_returns_what_flower_decodes(value: np.ndarray) -> None:
    array = Array(value)
    ours, flowers = decode(array), array.numpy()
    assert ours.dtype == flowers.dtype and ours.shape == flowers.shape
    np.testing.assert_array_equal(ours, flowers)


def test_decode_does_not_trust_a_header_that_disagrees_with_the_declared_shape() -> None:
    # Bytes of a (4, 3) array declared as (3, 4): the header is not the one NumPy writes for the
    # declaration, so the bytes go through np.load, which reads what they hold.
    held = Array(np.arange(12, dtype=np.float32).reshape(4, 3))
    lying = Array("float32", (3, 4), "numpy.ndarray", held.data)
    assert decode(lying).shape == (4, 3) == lying.numpy().shape


def test_decode_of_truncated_bytes_fails_like_np_load() -> None:
    whole = Array(np.arange(12, dtype=np.float32))
    cut = Array("float32", (12,), "numpy.ndarray", whole.data[:-4])
    with pytest.raises(ValueError):
        cut.numpy()
    with pytest.raises(ValueError):
        decode(cut)


def test_a_decoded_array_is_read_only_so_it_cannot_alter_the_message() -> None:
    value = decode(Array(np.arange(4, dtype=np.float32)))
    with pytest.raises(ValueError, match="read-only"):
        value[0] = 1.0


def test_the_digest_is_sha256_over_keys_dtypes_shapes_and_c_order_bytes() -> None:
    record = ArrayRecord()
    for i, value in enumerate(ODD_ARRAYS[:7]):
        record[f"k{i}"] = Array(value)
    expected = hashlib.sha256()
    for key, array in sorted(record.items()):
        value = np.ascontiguousarray(array.numpy())
        expected.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        expected.update(value.tobytes())
    assert arrays_digest(record) == expected.hexdigest()
