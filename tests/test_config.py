from pathlib import Path

import pytest
import yaml

from shoprank.config import Config, ConfigError, differences, load_config


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


def test_unquoted_text_override_says_how_to_quote_it():
    with pytest.raises(ConfigError, match=r"data\.item_template=\{title\}.*quote a text"):
        load_config(None, ["data.item_template={title}. {brand}."])
    quoted = load_config(None, ['data.item_template="{title}. {brand}."'])
    assert quoted.data.item_template == "{title}. {brand}."


def test_renamed_key_of_older_exports_still_loads():
    # Exports written before the rename carry eval.tfidf_decay in their saved config.
    from shoprank.config import Config

    old = Config().model_dump()
    del old["eval"]["history_decay"]
    old["eval"]["tfidf_decay"] = 0.3
    assert Config.model_validate(old).eval.history_decay == 0.3
    assert "history_decay" in Config().to_yaml()


ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted([*ROOT.glob("configs/*.yaml"), *ROOT.glob("tune/*.yaml")])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_config_file_loads_as_an_overlay_of_what_it_extends(path):
    """Each YAML validates, and names only values that differ from what it extends (the
    defaults for configs/synthetic.yaml): an overlay, not a copy that drifts from its base."""
    cfg = load_config(path)
    tree = yaml.safe_load(path.read_text())
    parent = tree.pop("extends", None)
    base = load_config((path.parent / parent).resolve() if parent else None)
    if path.name == "synthetic.yaml" and path.parent.name == "configs":
        assert cfg.model_dump(exclude={"run"}) == Config().model_dump(exclude={"run"})
    for section, values in tree.items():
        for key, value in values.items():
            ours, theirs = getattr(getattr(cfg, section), key), getattr(getattr(base, section), key)
            if section == "run" and key == "name":
                continue
            assert ours != theirs, f"{path.name}: {section}.{key}={value!r} repeats its base"


def test_all_config_files_are_covered():
    assert {p.name for p in CONFIGS} >= {"synthetic.yaml", "amazon.yaml", "amazon-retriever.yaml"}
    assert len(CONFIGS) >= 7


def test_differences_name_what_a_run_changed():
    cfg = load_config(ROOT / "configs/amazon.yaml", ["train.lr=5e-5"])
    changed = differences(cfg)
    assert changed["train.lr"] == 5e-5 and changed["data.history_len"] == 3
    assert "train.zero_stage" not in changed  # the default, not a change
    assert differences(Config()) == {}


def test_a_local_model_folder_is_made_absolute(tmp_path, monkeypatch) -> None:
    """Ray Train workers do not run in the driver's directory: a relative export path must
    reach them absolute, while hub ids and the bundled alias pass unchanged."""
    from shoprank.config import Config

    (tmp_path / "runs" / "ranker" / "export").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cfg = Config.model_validate({"model": {"name": "runs/ranker/export"}})
    assert cfg.model.name == str(tmp_path / "runs" / "ranker" / "export")
    for name in ("minilm", "sentence-transformers/all-MiniLM-L6-v2"):
        assert Config.model_validate({"model": {"name": name}}).model.name == name
