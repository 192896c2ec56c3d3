import pytest

from shoprank.config import ConfigError, load_config


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.001\n  zero_stage: 3\nlora:\n  r: 4\n")
    cfg = load_config(path, ["train.lr=5e-5", "lora.target_modules=[query,value]", "run.name=x"])
    assert cfg.train.lr == 5e-5
    assert cfg.train.zero_stage == 3
    assert cfg.lora.r == 4
    assert cfg.lora.target_modules == ["query", "value"]
    assert cfg.run.name == "x"
    # The saved YAML loads back to the same config.
    again = tmp_path / "again.yaml"
    again.write_text(cfg.to_yaml())
    assert load_config(again) == cfg


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.zero_stage=5", "train.zero_stage"),
        ("train.lrr=1", "train.lrr"),
        ("data.negatives=-1", "data.negatives"),
        ("eval.retrieve_top=0", "eval.retrieve_top"),
        ("nokey", "section.key=value"),
    ],
)
def test_bad_values_name_the_field(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


def test_renamed_key_of_older_exports_still_loads():
    # Exports written before the rename carry eval.tfidf_decay in their saved config.
    from shoprank.config import Config

    old = Config().model_dump()
    del old["eval"]["history_decay"]
    old["eval"]["tfidf_decay"] = 0.3
    assert Config.model_validate(old).eval.history_decay == 0.3
    assert "history_decay" in Config().to_yaml()
