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


def test_flags_go_through_the_config_type_checks():
    """CLI overrides were set with setattr, so a value of the wrong type skipped the checks a
    sift.toml gets."""
    from sift.config import SiftConfig, apply_overrides

    with pytest.raises(SiftError, match="train.epochs must be an integer"):
        apply_overrides(SiftConfig(), {("train", "epochs"): "3"})
    with pytest.raises(SiftError, match="lora.alpha must be a number"):
        apply_overrides(SiftConfig(), {("lora", "alpha"): "big"})
    cfg = apply_overrides(SiftConfig(), {("lora", "alpha"): 8, ("train", "lr"): 1e-3, ("data", "group_by"): None})
    assert cfg.lora.alpha == 8.0 and isinstance(cfg.lora.alpha, float) and cfg.train.lr == 1e-3
    with pytest.raises(SiftError, match="num_shards must be at least 1"):
        apply_overrides(SiftConfig(), {("shards", "num_shards"): 0})


def test_num_shards_is_bounded_by_the_merge_sums_headroom():
    """int64 sums of fixed-point terms below 2**53 hold 1024 adapters; more would wrap silently."""
    from sift.adapters import check_sum_headroom
    from sift.config import MAX_MERGE_MEMBERS, SiftConfig

    assert MAX_MERGE_MEMBERS == 1024 and (2**53 - 1) * MAX_MERGE_MEMBERS <= 2**63 - 1
    cfg = SiftConfig()
    cfg.shards.num_shards = MAX_MERGE_MEMBERS
    cfg.validate()
    cfg.shards.num_shards = MAX_MERGE_MEMBERS + 1
    with pytest.raises(SiftError, match="at most 1024"):
        cfg.validate()
    check_sum_headroom(MAX_MERGE_MEMBERS)
    with pytest.raises(SiftError, match="exceeds the 1024"):
        check_sum_headroom(MAX_MERGE_MEMBERS + 1)


def test_merge_params_table_round_trips_and_old_keys_stay_aliases(tmp_path):
    """A method's parameters live in [merge.params]; [merge] scale/density of the previous
    release still reach the method, and a config without params writes the bytes it wrote."""
    from sift.config import config_to_toml

    cfg = config_from_dict({"merge": {"method": "ties", "params": {"density": 0.3, "scale": 1}}})
    assert cfg.merge.params == {"density": 0.3, "scale": 1.0} and cfg.merge.given_params() == {
        "density": 0.3,
        "scale": 1.0,
    }
    text = config_to_toml(cfg)
    assert "[merge.params]\ndensity = 0.3\nscale = 1.0\n" in text
    path = tmp_path / "sift.toml"
    path.write_text(text)
    assert load_config(path) == cfg
    old = config_from_dict({"merge": {"method": "ties", "density": 0.5}})
    assert old.merge.given_params() == {"density": 0.5}
    assert "[merge.params]" not in config_to_toml(SiftConfig())
    with pytest.raises(SiftError, match="table of numbers"):
        config_from_dict({"merge": {"params": {"density": "high"}}})
    with pytest.raises(SiftError, match="given twice"):
        config_from_dict({"merge": {"density": 0.5, "params": {"density": 0.4}}}).merge.given_params()
