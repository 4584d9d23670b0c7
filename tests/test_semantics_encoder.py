"""TextEncoder: mean pooling over real tokens only, whatever the batch padding, against plain transformers."""
import numpy as np
import pytest
import torch

from megaclass.semantics import TextEncoder

TEXTS = ["crane", "a tabby cat asleep on a windowsill in the afternoon sun",
         "crane: lifts and moves heavy objects; a kind of lifting device", "tench, Tinca tinca", "a"]


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(batch_size=2)


def test_batched_encoding_equals_one_text_at_a_time(encoder):
    tokenizer, model = encoder._load()
    with torch.inference_mode():
        reference = []
        for text in TEXTS:  # one text, no padding: the mean over every token is the sentence vector
            hidden = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0].double()
            reference.append(torch.nn.functional.normalize(hidden.mean(0), dim=0).numpy())
    got = encoder.encode(TEXTS)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(got, np.stack(reference), atol=2e-5)


def test_bfloat16_stays_close_to_float32(encoder):
    fast = TextEncoder(batch_size=2, dtype="bfloat16")
    cosine = (fast.encode(TEXTS) * encoder.encode(TEXTS)).sum(1)
    assert cosine.min() > 0.999
    assert fast.identity != encoder.identity  # so their cached embeddings never mix


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="dtype must be float32 or bfloat16"):
        TextEncoder(dtype="float16")
    with pytest.raises(FileNotFoundError, match="encoder folder /no/such/model does not exist"):
        TextEncoder("/no/such/model")
