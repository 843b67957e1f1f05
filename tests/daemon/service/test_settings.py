import pytest

from daemon.service.settings import SettingsError, load_settings


def test_env_prefix_and_flags_override(monkeypatch):
    monkeypatch.setenv("FILIAL_KL_THRESHOLD", "0.3")
    monkeypatch.setenv("FILIAL_LIMITS__MAX_BATCH_ROWS", "99")
    assert load_settings().learner.kl_threshold == 0.3
    assert load_settings().limits.max_batch_rows == 99
    assert load_settings(kl_threshold="0.7").learner.kl_threshold == 0.7


@pytest.mark.parametrize("field, value, expect", [
    ("merge_method", "median", "merge.method (--merge-method, FILIAL_MERGE_METHOD): unknown merge method 'median' (allowed: auto, average, magmax, task_arithmetic, ties)"),
    ("kl_threshold", "-1", "learner.kl_threshold (--kl-threshold, FILIAL_KL_THRESHOLD): Input should be greater than 0"),
    ("log_format", "xml", "ops.log_format (--log-format, FILIAL_LOG_FORMAT): Input should be 'text' or 'json'"),
    ("device", "tpu", "model.device (--device, FILIAL_DEVICE): 'tpu' is not a device (allowed: auto, cpu, cuda, cuda:N)"),
    ("merge_cron", "every tuesday", "merge.cron (--merge-cron, FILIAL_MERGE_CRON): 'every tuesday' is not a crontab expression"),
    ("accuracy_threshold", "70", "learner.accuracy_threshold (--accuracy-threshold, FILIAL_ACCURACY_THRESHOLD): Input should be less than or equal to 1"),
])
def test_invalid_settings_name_the_field_and_what_is_allowed(field, value, expect):
    with pytest.raises(SettingsError) as info:
        load_settings(**{field: value})
    assert expect in str(info.value)


def test_unknown_setting_is_refused():
    with pytest.raises(SettingsError, match="kl_treshold"):
        load_settings(kl_treshold=0.1)


def test_sasl_needs_a_sasl_protocol():
    with pytest.raises(SettingsError, match="kafka_sasl_mechanism needs"):
        load_settings(kafka_sasl_mechanism="PLAIN")


def test_merge_groups_from_a_flag_or_the_environment(monkeypatch):
    groups = {"features": ["stages."], "head": ["head."]}
    assert load_settings(merge_groups='{"features": ["stages."], "head": ["head."]}').merge.groups == groups
    monkeypatch.setenv("FILIAL_MERGE_GROUPS", '{"features": ["stages."], "head": ["head."]}')
    assert load_settings().merge.groups == groups
    with pytest.raises(SettingsError, match=r"merge.groups \(--merge-groups, FILIAL_MERGE_GROUPS\): not JSON"):
        load_settings(merge_groups="features=stages.")


def test_nested_names_and_flat_names_reach_the_same_field(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FILIAL_LEARNER__REPLAY_RATIO", "0.5")
    monkeypatch.setenv("FILIAL_MERGE_TOLERANCE", "0.05")
    (tmp_path / ".env").write_text("FILIAL_KEEP_VERSIONS=3\nFILIAL_OPS__HEALTH_PORT=9000\n")
    s = load_settings()
    assert (s.learner.replay_ratio, s.merge.tolerance, s.publish.keep_versions, s.ops.health_port) == (0.5, 0.05, 3, 9000)
    monkeypatch.setenv("FILIAL_PUBLISH__KEEP_VERSIONS", "4")  # the environment outranks .env
    assert load_settings().publish.keep_versions == 4
    assert load_settings(keep_versions=5).publish.keep_versions == 5  # a flag outranks both


def test_every_field_has_one_flat_name():
    from daemon.service.settings import FLAT_NAMES, GROUPS

    nested = [(g, f) for g, model in GROUPS.items() for f in model.model_fields]
    assert sorted(FLAT_NAMES.values()) == sorted(nested)
    assert FLAT_NAMES["redis_ssl_ca_file"] == ("redis", "ssl_cafile")
    assert FLAT_NAMES["kafka_bootstrap"] == ("kafka", "bootstrap")


def test_unknown_variable_in_dotenv_is_refused(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("FILIAL_KL_TRESHOLD=0.1\n")
    with pytest.raises(SettingsError, match="kl_treshold"):
        load_settings()


def test_a_dotenv_shared_with_filial_serve_and_other_programs_is_read(monkeypatch, tmp_path):
    from daemon.service.settings import unknown_variables

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("FILIAL_SERVE__MODE=route\nOTHER=1\nFILIAL_KEEP_VERSIONS=3\n")
    assert load_settings().publish.keep_versions == 3
    assert unknown_variables({"FILIAL_SERVE__MODE": "route"}) == []   # filial serve checks its own


def test_a_misspelt_variable_is_named_with_the_nearest_setting():
    from daemon.service.settings import unknown_variables

    warnings = unknown_variables({"FILIAL_KL_TRESHOLD": "0.3", "FILIAL_TOPIC": "in", "FILIAL_MERGE__ALPHA": "0.1",
                                  "FILIAL_LIMITS__MAX_MESSAGE_BYTES": "1024", "FILIAL_CHAOS_TRACE": "/tmp/t",
                                  "FILIAL_MERGE": "{}", "HOME": "/root"})
    assert warnings == ["FILIAL_KL_TRESHOLD is not a filial setting and is ignored; did you mean FILIAL_KL_THRESHOLD?"]
    assert "filial run --help" in unknown_variables({"FILIAL_QWERTYUIOP": "1"})[0]


@pytest.mark.parametrize("flat,value,says", [
    ("redis_url", "localhost:6379", "must start with redis://"),
    ("kafka_bootstrap", "not a host", "must be host:port"),
    ("signing_key_file", "/nonexistent/key", "cannot read /nonexistent/key"),
    ("redis_password_file", "/nonexistent/pw", "cannot read /nonexistent/pw"),
])
def test_a_bad_address_or_unreadable_secret_fails_at_start_naming_the_field(flat, value, says):
    """Caught while the settings are read, before any server is started or contacted (a bad URL was a
    traceback, an unreadable secret was found only after the embedded servers had started, a
    bootstrap that is no host was retried forever)."""
    with pytest.raises(SettingsError, match=f"FILIAL_{flat.upper()}\\): {says}"):
        load_settings(**{flat: value})


def test_every_setting_is_documented_in_the_readme():
    from pathlib import Path

    from daemon.service.settings import FLAT_NAMES

    readme = Path(__file__).resolve().parents[3].joinpath("README.md").read_text()
    # the settings table names them `flat`; the security table by their variable without FILIAL_
    missing = [flat for flat in FLAT_NAMES if f"`{flat}`" not in readme and f"`{flat.upper()}`" not in readme
               and f"FILIAL_{flat.upper()}" not in readme]
    assert not missing, f"settings not in README.md: {missing}"
