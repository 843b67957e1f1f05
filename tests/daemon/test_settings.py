import pytest

from daemon.settings import SettingsError, load_settings


def test_env_prefix_and_flags_override(monkeypatch):
    monkeypatch.setenv("FILIAL_KL_THRESHOLD", "0.3")
    monkeypatch.setenv("FILIAL_LIMITS__MAX_BATCH_ROWS", "99")
    assert load_settings().kl_threshold == 0.3
    assert load_settings().limits.max_batch_rows == 99
    assert load_settings(kl_threshold="0.7").kl_threshold == 0.7


@pytest.mark.parametrize("field, value, expect", [
    ("merge_method", "median", "merge_method: unknown merge method 'median' (allowed: auto, average, magmax, task_arithmetic, ties)"),
    ("kl_threshold", "-1", "kl_threshold: Input should be greater than 0"),
    ("log_format", "xml", "log_format: Input should be 'text' or 'json'"),
    ("device", "tpu", "device: 'tpu' is not a device (allowed: auto, cpu, cuda, cuda:N)"),
    ("merge_cron", "every tuesday", "merge_cron: 'every tuesday' is not a crontab expression"),
    ("accuracy_threshold", "70", "accuracy_threshold: Input should be less than or equal to 1"),
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
    assert load_settings(merge_groups='{"features": ["stages."], "head": ["head."]}').merge_groups == groups
    monkeypatch.setenv("FILIAL_MERGE_GROUPS", '{"features": ["stages."], "head": ["head."]}')
    assert load_settings().merge_groups == groups
    with pytest.raises(SettingsError, match="merge_groups: not JSON"):
        load_settings(merge_groups="features=stages.")
