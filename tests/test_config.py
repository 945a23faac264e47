"""Config loading: ``--set`` overrides are read by the field's type (issue: YAML turned ``no`` into False)."""

from __future__ import annotations

import pytest

from fastinpo.config import load_config as _load_config

REQUIRED = ["model.path=pipe", "data.path=pairs"]  # validate() needs both; nothing is opened


def load_config(path, overrides=()):
    return _load_config(path, [*REQUIRED, *overrides])


@pytest.mark.parametrize("raw", ["no", "off", "on", "yes", "null", "true", "1e-4", "~"])
def test_set_takes_string_fields_as_written(raw):
    config = load_config(None, [f"train.output_dir={raw}"])
    assert config.train.output_dir == raw


def test_set_mixed_precision_no_is_the_string_no():
    config = load_config(None, ["train.mixed_precision=fp16", "train.mixed_precision=no"])
    assert config.train.mixed_precision == "no"


def test_set_optional_string_takes_null_as_none_and_text_as_text():
    assert load_config(None, ["model.unet_init=null"]).model.unet_init is None
    assert load_config(None, ["model.unet_init="]).model.unet_init is None
    assert load_config(None, ["model.unet_init=off"]).model.unet_init == "off"
    assert load_config(None, ["model.unet_init=\"null\""]).model.unet_init == "null"


def test_set_non_string_fields_are_still_parsed():
    config = load_config(None, ["optim.lr=1e-4", "train.max_steps=7", "model.gradient_checkpointing=true",
                                "data.max_rows=null"])
    assert config.optim.lr == pytest.approx(1e-4) and isinstance(config.optim.lr, float)
    assert config.train.max_steps == 7
    assert config.model.gradient_checkpointing is True
    assert config.data.max_rows is None


def test_set_bad_literal_names_the_choices():
    with pytest.raises(ValueError, match=r"train\.mixed_precision must be one of 'no', 'fp16', 'bf16', got 'fp8'"):
        load_config(None, ["train.mixed_precision=fp8"])


def test_yaml_boolean_in_a_string_field_says_to_quote_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    with pytest.raises(ValueError, match=r"got False \(YAML reads unquoted no/off/yes/on as booleans.*quote"):
        load_config(path)
    path.write_text("train:\n  mixed_precision: \"no\"\n")
    assert load_config(path).train.mixed_precision == "no"
