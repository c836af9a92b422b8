"""The kms command: subcommands against a real daemon, --json, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

from kms.cli import main, parse_since


def run(server, capsys, *args):
    code = main(["--socket", server.socket_path, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_key_lifecycle(kms_server, capsys):
    code, out, _ = run(kms_server, capsys, "--json", "create-key", "--alias", "cli/key", "--description", "d")
    assert code == 0
    kid = json.loads(out)["key_info"]["key_id"]
    code, out, _ = run(kms_server, capsys, "list-keys")
    assert code == 0 and "KEY_ID" in out and kid in out and "cli/key" in out and "enabled" in out
    code, out, _ = run(kms_server, capsys, "describe-key", "cli/key")
    assert code == 0 and kid in out and "2 (enabled)" in out
    code, out, _ = run(kms_server, capsys, "--json", "create-datakey", "cli/key", "--aad", "x")
    dk = json.loads(out)
    code, out, _ = run(kms_server, capsys, "--json", "decrypt-datakey", "cli/key", "--cipher-text",
                       dk["cipher_text"], "--aad", "x")
    assert code == 0 and json.loads(out)["data_key"] == dk["plain_text"]
    code, out, _ = run(kms_server, capsys, "disable-key", "cli/key")
    assert code == 0 and "3 (disabled)" in out
    code, out, err = run(kms_server, capsys, "create-datakey", "cli/key")
    assert code == 1 and out == "" and err.strip().startswith("kms: KMS.0209")
    assert len(err.strip().splitlines()) == 1
    code, out, err = run(kms_server, capsys, "describe-key", "no/such/alias")
    assert code == 1 and "KMS.0207" in err


def test_cli_json_flag_after_subcommand(kms_server, capsys):
    code, out, _ = run(kms_server, capsys, "list-keys", "--json")
    assert code == 0 and json.loads(out)["total"] == 0


def test_cli_without_daemon_is_one_line(tmp_path):
    sock = str(tmp_path / "missing.sock")
    p = subprocess.run([sys.executable, "-m", "kms", "--socket", sock, "list-keys"], capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.strip() == (f"kms: no KMS answers at {sock} (No such file or directory); "
                                f"start one with: kms serve --socket {sock} --data-dir DIR")


def test_cli_usage_errors(tmp_path, capsys):
    assert main(["no-such-command"]) == 2
    assert main(["serve", "--socket", str(tmp_path / "s"), "--data-dir", str(tmp_path / "d"),
                 "--socket-mode", "abc"]) == 2
    err = capsys.readouterr().err
    assert "octal" in err and "Traceback" not in err


def test_cli_env_socket(kms_server, monkeypatch, capsys):
    monkeypatch.setenv("KMS_SOCKET", kms_server.socket_path)
    assert main(["gen-random", "--bits", "64"]) == 0
    assert len(capsys.readouterr().out.strip()) == 16


def test_serve_refuses_unsafe_data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir(mode=0o777)
    d.chmod(0o777)
    p = subprocess.run([sys.executable, "-m", "kms", "serve", "--socket", str(tmp_path / "s.sock"),
                        "--data-dir", str(d)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and "writable by group or others" in p.stderr and "Traceback" not in p.stderr


def test_parse_since():
    assert parse_since("10m", now=1000.0) == 400_000
    assert parse_since("1700000000") == 1_700_000_000_000
    assert parse_since("2026-01-01T00:00:00") > 0
