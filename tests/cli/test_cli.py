"""The command line: config-file precedence, and `kvcellar cache` on a real disk tier."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvcellar import cli


def _kvcellar(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvcellar.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})  # fmt: skip


def test_config_file_sets_defaults_and_env_and_flags_override(tmp_path, monkeypatch):
    config = tmp_path / "kvcellar.toml"
    config.write_text('block-size = 512\ndevice-cache-size = "1G"\nexact = false\n')
    monkeypatch.setattr(cli, "_CONFIG_FILE_VALUES", {})
    cli._load_config_file(["--config", str(config), "generate", "--prompt", "x"])
    monkeypatch.setenv("KVCELLAR_DEVICE_CACHE_SIZE", "3G")
    args = cli.build_parser().parse_args(["generate", "--prompt", "x", "--no-exact"])
    assert args.block_size == 512  # from the file
    assert args.device_cache_size == "3G"  # the environment beats the file
    args = cli.build_parser().parse_args(["generate", "--prompt", "x", "--block-size", "64"])
    assert args.block_size == 64  # the command line beats both


def test_bad_config_file_is_a_clear_error(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("block-size = [")
    result = _kvcellar("--config", str(config), "cache", "stats")
    assert result.returncode != 0 and "not valid TOML" in result.stderr


def test_cache_commands_on_a_disk_tier_written_by_generate(tiny_model_dirs, tmp_path):
    cache_dir = str(tmp_path / "kv")
    run = _kvcellar("generate", "--model", str(tiny_model_dirs["qwen3"]), "--prompt", "hello cache " * 20,
                    "--max-tokens", "2", "--block-size", "16", "--cache-dir", cache_dir)  # fmt: skip
    assert run.returncode == 0, run.stderr
    stats = json.loads(_kvcellar("cache", "stats", "--cache-dir", cache_dir).stdout)
    entries = [json.loads(line) for line in _kvcellar("cache", "ls", "--cache-dir", cache_dir).stdout.splitlines()]
    assert stats["num_entries"] == len(entries) > 0
    index = tmp_path / "kv" / "index.sqlite3"
    index.write_bytes(os.urandom(index.stat().st_size))  # damaged: the CLI rebuilds it from the entry files
    repaired = _kvcellar("cache", "stats", "--cache-dir", cache_dir)
    assert repaired.returncode == 0, repaired.stderr
    assert json.loads(repaired.stdout)["num_entries"] == stats["num_entries"] and json.loads(repaired.stdout)["index_rebuilt"]
    assert len(_kvcellar("cache", "ls", "--cache-dir", cache_dir).stdout.splitlines()) == len(entries)
    index.write_bytes(os.urandom(index.stat().st_size))  # and clear works on a damaged index too
    cleared = _kvcellar("cache", "clear", "--cache-dir", cache_dir)
    assert cleared.returncode == 0 and f"removed {len(entries)} entries" in cleared.stdout
    assert json.loads(_kvcellar("cache", "stats", "--cache-dir", cache_dir).stdout)["num_entries"] == 0


@pytest.mark.parametrize("args, message", [(["generate", "--model", "/nonexistent/model", "--prompt", "x"], "does not exist"),
                                           (["make-model", "--arch", "llama9", "/tmp/x"], "qwen3")])
def test_user_errors_exit_2_with_a_message(args, message):
    result = _kvcellar(*args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_disk_write_queue_size_reaches_the_cache_config(monkeypatch):
    monkeypatch.setattr(cli, "_CONFIG_FILE_VALUES", {})
    monkeypatch.setenv("KVCELLAR_DISK_WRITE_QUEUE_SIZE", "3G")
    args = cli.build_parser().parse_args(["generate", "--prompt", "x", "--model", "some-folder"])
    assert cli._engine_config(args).cache.disk_write_queue_bytes == 3 * 1024**3
    args = cli.build_parser().parse_args(["generate", "--prompt", "x", "--model", "m", "--disk-write-queue-size", "512M"])
    assert cli._engine_config(args).cache.disk_write_queue_bytes == 512 * 1024**2


def test_version_is_the_installed_distributions():
    from importlib.metadata import version

    done = _kvcellar("--version")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"kvcellar {version('kvcellar')}\n", "")


def test_metrics_public_flag_and_its_environment_variable(monkeypatch):
    assert cli.build_parser().parse_args(["serve"]).metrics_public is False
    assert cli.build_parser().parse_args(["serve", "--metrics-public"]).metrics_public is True
    monkeypatch.setenv("KVCELLAR_METRICS_PUBLIC", "1")
    assert cli.build_parser().parse_args(["serve"]).metrics_public is True


def _subparsers(parser) -> dict:
    import argparse

    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = sub
                found.update({f"{name} {child}": grandchild for child, grandchild in _subparsers(sub).items()})
    return found


def test_every_command_prints_its_help():
    """argparse formats help strings with %: a literal percent sign in one broke `serve --help` and `bench --help`."""
    commands = _subparsers(cli.build_parser())
    assert {"serve", "bench", "generate", "cluster"} <= set(commands)
    for name, parser in commands.items():
        text = parser.format_help()
        assert parser.prog.endswith(name) and "usage:" in text
    assert "40% of the memory free after loading" in " ".join(commands["serve"].format_help().split())
