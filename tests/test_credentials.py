"""Credentials kept out of what is committed or visible: a DVC remote's secrets in the committed
`.dvc/config`, passwords on the tracking server's command line, an S3 endpoint with a password."""

from __future__ import annotations

import pytest

from src.config.checks import remote_credentials
from src.errors import ConfigError
from src.tracking import server

SECRET = "s3cr3tVALUE"


@pytest.mark.parametrize(
    "lines, option",
    [
        (["url = s3://bucket/pipeline", f"secret_access_key = {SECRET}"], "secret_access_key"),
        (["url = s3://bucket/pipeline", "access_key_id = AKIAEXAMPLE"], "access_key_id"),
        ([f"url = https://user:{SECRET}@dav.example.com/dvc"], "url"),
        (
            ["url = s3://bucket/pipeline", f"endpointurl = http://minio:{SECRET}@127.0.0.1:9000"],
            "endpointurl",
        ),
        (["url = ssh://user@host/dvc", f"password = {SECRET}"], "password"),
    ],
)
def test_a_remote_with_credentials_in_the_committed_dvc_config_is_refused(tmp_path, lines, option):
    config = tmp_path / "config"
    config.write_text(
        "[core]\n    remote = team\n['remote \"team\"']\n" + "".join(f"    {x}\n" for x in lines)
    )
    with pytest.raises(ConfigError) as refused:
        remote_credentials(config)
    message = str(refused.value)
    assert f"{config}:" in message and "'team'" in message and repr(option) in message
    assert "dvc remote modify --local team" in message and "AWS_ACCESS_KEY_ID" in message
    assert SECRET not in message and "AKIAEXAMPLE" not in message


def test_remotes_without_credentials_pass(tmp_path):
    config = tmp_path / "config"
    config.write_text(
        "[core]\n    remote = local\n['remote \"local\"']\n    url = ../../dvc-storage\n"
        "['remote \"s3\"']\n    url = s3://bucket/x\n    endpointurl = http://127.0.0.1:9000\n"
        "    region = eu-west-1\n[cache]\n    type = hardlink\n"
    )
    remote_credentials(config)
    remote_credentials(tmp_path / "absent")
    remote_credentials()  # the project's own .dvc/config


@pytest.mark.parametrize(
    "args, env, key",
    [
        (["--backend-store-uri", f"postgresql://mlflow:{SECRET}@db:5432/mlflow"], {}, "--backend-store-uri"),
        (
            ["--backend-store-uri", "postgresql://mlflow@db/mlflow", "--artifacts-destination",
             f"s3://AKIAEXAMPLE:{SECRET}@bucket/mlflow"],
            {},
            "--artifacts-destination",
        ),
        (
            ["--backend-store-uri", "postgresql://mlflow@db/mlflow"],
            {"MLFLOW_S3_ENDPOINT_URL": f"http://minio:{SECRET}@127.0.0.1:9000"},
            "MLFLOW_S3_ENDPOINT_URL",
        ),
    ],
)  # fmt: skip
def test_the_tracking_server_refuses_credentials_before_starting_anything(
    monkeypatch, capsys, args, env, key
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert server.main(args) == 2
    err = capsys.readouterr().err
    assert f"{key} carries credentials" in err and SECRET not in err and "AKIAEXAMPLE" not in err
    home = "PGPASSWORD" if key == "--backend-store-uri" else "AWS_SECRET_ACCESS_KEY"
    assert home in err
