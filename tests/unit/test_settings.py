"""Plugin settings: precedence, coercion and clear errors (pure, no engine)."""

import json

import pytest

from dspark_sglang.sglang.settings import (
    PluginSettings,
    PluginSettingsError,
    builtin_requested,
    load_settings,
)


def test_defaults():
    assert load_settings(environ={}) == PluginSettings()
    assert PluginSettings().scheduler == "lagged" and PluginSettings().lag == 2


def test_precedence_env_over_json_over_server_args(tmp_path):
    table = tmp_path / "sps.json"
    table.write_text("{}")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"scheduler": "fixed", "fixed_len": 3, "lag": 1}))
    env = {"DSPARK_CONFIG": str(cfg), "DSPARK_FIXED_LEN": "5"}
    s = load_settings(environ=env, server_defaults={"cost_table": str(table), "lag": 4, "gamma": None})
    # lag: JSON (1) beats the server default (4); fixed_len: env (5) beats JSON (3)
    assert (s.scheduler, s.fixed_len, s.lag, s.cost_table) == ("fixed", 5, 1, str(table))


@pytest.mark.parametrize(
    "env, message",
    [
        ({"DSPARK_SCHEDULER": "greedy"}, "scheduler"),
        ({"DSPARK_SCHEDULER": "fixed"}, "fixed_len"),
        ({"DSPARK_FIXED_LEN": "three"}, "DSPARK_FIXED_LEN"),
        ({"DSPARK_GAMMA": "0"}, "gamma"),
        ({"DSPARK_LAG": "-1"}, "lag"),
        ({"DSPARK_COST_TABLE": "/nonexistent/sps.json"}, "cost_table"),
        ({"DSPARK_STS": "/nonexistent/sts.json"}, "sts"),
        ({"DSPARK_CONFIG": "/nonexistent/cfg.json"}, "DSPARK_CONFIG"),
        ({"DSPARK_TEST_BREAK": "residual"}, "test_break"),
    ],
)
def test_bad_env_is_refused_with_the_field_named(env, message):
    with pytest.raises(PluginSettingsError, match=message):
        load_settings(environ=env)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"schedulr": "lagged"}', "unknown keys"),
        ('{"lag": "two"}', "lag"),
        ('{"lag": true}', "lag"),
        ('{"scheduler": 3}', "scheduler"),
    ],
)
def test_bad_json_is_refused_with_file_and_field(tmp_path, content, message):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(content)
    with pytest.raises(PluginSettingsError, match=message) as err:
        load_settings(environ={"DSPARK_CONFIG": str(cfg)})
    assert str(cfg) in str(err.value) or "lag" in str(err.value) or "scheduler" in str(err.value)


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("0", False), ("", False)])
def test_opt_out(value, expected):
    assert builtin_requested({"DSPARK_USE_BUILTIN": value}) is expected
    assert builtin_requested({}) is False


def test_worker_fields(tmp_path):
    est = tmp_path / "est.json"
    est.write_text("{}")
    s = load_settings(environ={"DSPARK_ESTIMATOR": str(est), "DSPARK_STATS_EVERY": "0",
                               "DSPARK_KEEP_RADIX_CACHE": "yes"})
    assert (s.estimator, s.stats_every, s.keep_radix_cache) == (str(est), 0, True)
    assert PluginSettings().keep_radix_cache is None  # auto: decided by the drafter family (module doc)
    assert load_settings(environ={"DSPARK_KEEP_RADIX_CACHE": "auto"}).keep_radix_cache is None
    assert load_settings(environ={"DSPARK_KEEP_RADIX_CACHE": "0"}).keep_radix_cache is False
    with pytest.raises(PluginSettingsError, match="keep_radix_cache"):
        load_settings(environ={"DSPARK_KEEP_RADIX_CACHE": "maybe"})
    with pytest.raises(PluginSettingsError, match="stats_every"):
        load_settings(environ={"DSPARK_STATS_EVERY": "-5"})


def test_radix_cache_default_follows_where_the_drafter_keeps_its_context():
    from pathlib import Path

    from dspark_sglang.sglang.spec_class import PluginConfig, keeps_radix_cache

    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "drafters"
    auto, off, on = PluginSettings(), PluginSettings(keep_radix_cache=False), PluginSettings(keep_radix_cache=True)
    for name, pooled in (("deepspec_dspark_vanilla", True), ("zlab_dflash", True), ("deepspec_eagle3", False)):
        path = str(fixtures / name)
        assert keeps_radix_cache(PluginConfig(auto, path, 7, 7)) is pooled
        assert keeps_radix_cache(PluginConfig(off, path, 7, 7)) is False
        assert keeps_radix_cache(PluginConfig(on, path, 7, 7)) is True
