import pytest

from sift.config import SiftConfig, config_from_dict, config_to_toml, load_config
from sift.errors import SiftError


def test_toml_round_trip(tmp_path):
    cfg = SiftConfig()
    cfg.data.group_by = "owner"
    cfg.train.lr = 3e-4
    cfg.lora.target_modules = ["q_proj", "v_proj"]
    path = tmp_path / "sift.toml"
    path.write_text(config_to_toml(cfg))
    assert load_config(path) == cfg


def test_unknown_keys_and_types_are_refused():
    with pytest.raises(SiftError, match="unknown key train.lrate"):
        config_from_dict({"train": {"lrate": 1.0}})
    with pytest.raises(SiftError, match="unknown section"):
        config_from_dict({"trainer": {}})
    with pytest.raises(SiftError, match="must be an integer"):
        config_from_dict({"train": {"epochs": "10"}})
    with pytest.raises(SiftError, match="num_shards"):
        config_from_dict({"shards": {"num_shards": 0}})


def test_training_hash_covers_training_not_merging():
    a, b = SiftConfig(), SiftConfig()
    b.merge.method = "task-arithmetic"
    assert a.training_hash() == b.training_hash()
    b.train.lr = 5e-4
    assert a.training_hash() != b.training_hash()
