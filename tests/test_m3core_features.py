"""Router features equal their definitions computed the slow, obvious way."""

import numpy as np
import pytest
import torch

from m3core.features import feature_names, router_features


def test_features_match_their_definitions(micro_lmm, colour_dataset):
    rows = colour_dataset.select(range(3))
    images = [r["image"] for r in rows]
    questions = [r["question"] for r in rows]
    questions[0] = "what colour ?"
    encoded = micro_lmm.encode(images)
    X = router_features(micro_lmm, encoded, questions)
    assert X.shape == (len(rows), len(feature_names(micro_lmm)))
    assert X.dtype == np.float32

    first = micro_lmm.model.visual_tokens(encoded.nested, micro_lmm.scales[0])[:, 0]
    embed = micro_lmm.model.get_input_embeddings()
    template = micro_lmm.nesting.prompt_template
    question_vectors = []
    for q in questions:
        ids = micro_lmm.tokenizer(template.format(question=q))["input_ids"]
        words = [i for i in ids if i != micro_lmm.image_token_id]
        question_vectors.append(embed(torch.tensor(words)).mean(0))
    reference = torch.cat([first, torch.stack(question_vectors)], 1).detach()
    np.testing.assert_allclose(X, reference.numpy(), rtol=1e-4, atol=1e-4)


def test_shared_images_and_questions_are_featurised_once_with_the_same_result(
    micro_lmm, colour_dataset
):
    a, b = colour_dataset.select([0, 2])["image"]
    images = [a, b, a, a]
    left, right = "what colour is the left side ?", "what colour is the right side ?"
    questions = [left, right, left, "what colour ?"]
    encoded = micro_lmm.encode(images)
    assert len(encoded.distinct) == 2
    shared = router_features(micro_lmm, encoded, questions)
    pairs = zip(images, questions, strict=True)
    one_by_one = [router_features(micro_lmm, micro_lmm.encode([i]), [q]) for i, q in pairs]
    alone = np.concatenate(one_by_one)
    np.testing.assert_allclose(shared, alone, rtol=1e-5, atol=1e-6)
    picked = router_features(micro_lmm, encoded.select([3, 1]), [questions[3], questions[1]])
    np.testing.assert_allclose(picked, alone[[3, 1]], rtol=1e-5, atol=1e-6)
    prompts = micro_lmm.tokenize(questions)  # what generate reads: no second tokenization
    np.testing.assert_allclose(router_features(micro_lmm, encoded, prompts), shared)


def test_features_need_one_question_per_encoding(micro_pool, colour_dataset):
    encoded = micro_pool.encode(colour_dataset.select(range(2))["image"])
    with pytest.raises(ValueError, match="2 encodings for 1 questions"):
        router_features(micro_pool, encoded, ["what colour ?"])
