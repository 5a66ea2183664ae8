"""The config loader: shipped configs load, bad keys and values are named with what is allowed."""

from pathlib import Path

import pytest

from mdm_dist.config import Config, ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "350m.yaml", "1b.yaml", "7b.yaml", "vae_tiny.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # A round trip through a plain dict (as stored in checkpoints) gives the same config.
    assert config_from_dict(cfg.to_dict()) == cfg


def test_defaults_load():
    assert load_config(None) == Config()


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_key_file_and_allowed(tmp_path):
    p = _write(tmp_path, "model:\n  n_layer: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "'model.n_layer'" in msg and "n_layers" in msg and "d_model" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'modle'.*model, vae, diffusion"):
        load_config(_write(tmp_path, "modle: {}\n"))


def test_bad_literal_names_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match=r"'diffusion.objective' = 'dsm' is not allowed; allowed values: se, ddpm"):
        load_config(_write(tmp_path, "diffusion:\n  objective: dsm\n"))


def test_bad_type(tmp_path):
    with pytest.raises(ConfigError, match=r"'model.d_model' must be an integer"):
        load_config(_write(tmp_path, "model:\n  d_model: wide\n"))


def test_bad_direction(tmp_path):
    with pytest.raises(ConfigError, match=r"'model.image_directions' contains 'diag'; allowed values: row, row_rev, col, col_rev"):
        load_config(_write(tmp_path, "model:\n  image_directions: [row, diag]\n"))


def test_overrides_apply_and_parse_yaml_values():
    cfg = load_config(None, ["train.lr=3e-4", "model.n_layers=7", "model.long_skip=true",
                              "model.image_directions=[row, col]", "diffusion.objective=ddpm",
                              "diffusion.text_process=gaussian"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.model.n_layers == 7 and cfg.model.long_skip is True
    assert cfg.model.image_directions == ["row", "col"]
    assert cfg.diffusion.objective == "ddpm"


def test_optional_key_takes_null_or_its_type(tmp_path):
    assert load_config(None).diffusion.caption_guidance_scale is None
    assert load_config(None, ["diffusion.caption_guidance_scale=2"]).diffusion.caption_guidance_scale == 2.0
    assert load_config(None, ["diffusion.caption_guidance_scale=2", "diffusion.caption_guidance_scale=null"]
                       ).diffusion.caption_guidance_scale is None
    with pytest.raises(ConfigError, match=r"'diffusion.caption_guidance_scale' must be a number, got 'high'"):
        load_config(_write(tmp_path, "diffusion:\n  caption_guidance_scale: high\n"))


def test_override_errors():
    with pytest.raises(ConfigError, match=r"--set train.lrr=1.*unknown key 'train.lrr'.*allowed keys in 'train': lr"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(None, ["train.lr.x=1"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="headdim"):
        load_config(None, ["model.d_model=100", "model.headdim=64"])
    with pytest.raises(ConfigError, match="text_process"):
        load_config(None, ["diffusion.objective=ddpm"])
    with pytest.raises(ConfigError, match="vae.image_size"):
        load_config(None, ["vae.image_size=30"])
    with pytest.raises(ConfigError, match="multiple of 'train.micro_batch_size'"):
        load_config(None, ["train.global_batch_size=10", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="must be > 0"):
        load_config(None, ["model.n_layers=0"])
    with pytest.raises(ConfigError, match="'diffusion.text_temperature' = -0.1; it must be >= 0"):
        load_config(None, ["diffusion.text_temperature=-0.1"])
    assert load_config(None, ["diffusion.text_temperature=0"]).diffusion.text_temperature == 0.0
    for key in ("image_time_power", "text_time_power"):
        for bad in ("0", "-1", "inf"):
            with pytest.raises(ConfigError, match=f"'diffusion.{key}' = {float(bad)}; it must be a finite"):
                load_config(None, [f"diffusion.{key}={bad}"])
        assert getattr(load_config(None, [f"diffusion.{key}=2"]).diffusion, key) == 2.0


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")
