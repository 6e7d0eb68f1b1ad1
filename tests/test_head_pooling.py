"""`head.pooling`: what a sequence head reads. `mean` is the masked mean of the last hidden
states (checked against a float64 computation from the encoder's own outputs), it is part of
a run's identity only when set, and a family or task it cannot serve is refused up front."""

from __future__ import annotations

import pytest
import torch

from harness.modeling.models import MaskedMeanPooler, use_mean_pooling
from harness.spec import identity
from harness.spec.config import ConfigError
from harness.spec.identity import TrialSpec
from tests.builders import tiny_bert, trial_spec


def resolved(data_dir: str, **fields) -> TrialSpec:
    return identity.resolve([trial_spec(data_dir).model_copy(update=fields)])[0]


def _padded_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 100, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0  # padded rows: the mean must skip these positions
    mask[2, 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_mean_pooling_feeds_the_classifier_the_masked_mean_of_the_last_hidden_states():
    model = tiny_bert()
    batch = _padded_batch()
    use_mean_pooling(model)
    assert isinstance(model.bert.pooler, MaskedMeanPooler)
    logits = model(**batch).logits.double()

    hidden = model.bert(**batch).last_hidden_state.double()
    mask = batch["attention_mask"].double().unsqueeze(-1)
    mean = (hidden * mask).sum(1) / mask.sum(1)
    weight, bias = model.classifier.weight.double(), model.classifier.bias.double()
    torch.testing.assert_close(logits, mean @ weight.T + bias, rtol=1e-5, atol=1e-6)


def test_mean_pooling_ignores_padding():
    model = tiny_bert()
    use_mean_pooling(model)
    batch = _padded_batch()
    alone = model(input_ids=batch["input_ids"][1:2, :4]).logits
    padded = model(**batch).logits[1:2]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-6)


def test_cls_and_mean_differ_so_the_setting_is_not_a_no_op():
    batch = _padded_batch()
    cls_logits = tiny_bert()(**batch).logits
    mean_model = tiny_bert()
    use_mean_pooling(mean_model)
    assert not torch.allclose(cls_logits, mean_model(**batch).logits)


def test_pooling_enters_the_key_only_when_not_the_models_own_head(mirror_dir):
    default = resolved(mirror_dir)
    assert resolved(mirror_dir, head_pooling="cls").key() == default.key()
    mean = resolved(mirror_dir, head_pooling="mean")
    assert mean.key() != default.key() and mean.setting_key() != default.setting_key()


def test_mean_pooling_on_a_family_without_a_pooler_is_refused_before_any_trial(mirror_dir):
    with pytest.raises(ConfigError, match="head.pooling 'mean' applies to sequence heads"):
        resolved(mirror_dir, head_pooling="mean", model_id="random-init/t5-d64-l2")


def test_an_unknown_pooling_is_a_config_error():
    with pytest.raises(ValueError, match="pooling"):
        TrialSpec.model_validate({**trial_spec("unused").model_dump(), "head_pooling": "max"})
