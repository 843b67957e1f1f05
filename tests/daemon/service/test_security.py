"""Credentials reach the clients, from settings or from secrets files, and never the logs."""

from __future__ import annotations

import pytest
import redis

from daemon.service.service import kafka_connection, redis_client as make_redis_client, signing_key
from daemon.service.settings import SettingsError, load_settings


def test_secrets_files_reach_kafka_redis_and_signing(tmp_path):
    (tmp_path / "kafka").write_text("kafka-pass\n")
    (tmp_path / "redis").write_text("redis-pass\n")
    (tmp_path / "hmac").write_text("hmac-key\n")
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")  # certificates must be readable at start
    s = load_settings(kafka_bootstrap="broker:9093", redis_url="rediss://cache:6380/0",
                      kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
                      kafka_sasl_username="filial", kafka_sasl_password_file=tmp_path / "kafka",
                      kafka_ssl_cafile=tmp_path / "ca.pem", redis_username="filial",
                      redis_password_file=tmp_path / "redis", redis_ssl_ca_file=tmp_path / "ca.pem",
                      signing_key_file=tmp_path / "hmac")
    kwargs = kafka_connection(s).client_kwargs()
    assert kwargs["security_protocol"] == "SASL_SSL" and kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kwargs["sasl_plain_username"] == "filial" and kwargs["sasl_plain_password"] == "kafka-pass"
    assert kwargs["ssl_cafile"] == str(tmp_path / "ca.pem")
    conn = make_redis_client(s).connection_pool.connection_kwargs
    assert conn["username"] == "filial" and conn["password"] == "redis-pass"
    assert conn["ssl_ca_certs"] == str(tmp_path / "ca.pem")
    assert signing_key(s) == b"hmac-key"
    # a value given directly wins over its file; the logged settings mask secrets
    s2 = load_settings(redis_url="redis://x:1/0", redis_password="direct", redis_password_file=tmp_path / "redis",
                       signing_key="k")
    assert make_redis_client(s2).connection_pool.connection_kwargs["password"] == "direct"
    public = s2.public_dict()
    assert "direct" not in str(public) and public["publish"]["signing_key"] == "**********"


def test_missing_secrets_file_is_a_clear_error_at_start(tmp_path):
    with pytest.raises(SettingsError, match=r"redis.password_file .*: cannot read .*nope: No such file"):
        load_settings(redis_url="redis://x:1/0", redis_password_file=tmp_path / "nope")


def test_redis_acl_user_and_password(redis_server, redis_client, unique):
    redis_client.execute_command("ACL", "SETUSER", unique, "on", ">right-pass", "~*", "+@all")
    try:
        good = load_settings(redis_url=redis_server.address, redis_username=unique, redis_password="right-pass")
        assert make_redis_client(good).ping()
        bad = load_settings(redis_url=redis_server.address, redis_username=unique, redis_password="wrong")
        with pytest.raises(redis.AuthenticationError):
            make_redis_client(bad).ping()
    finally:
        redis_client.execute_command("ACL", "DELUSER", unique)
