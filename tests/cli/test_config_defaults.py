"""config.py is the only home of defaults: the command line and the docs' tables agree with its dataclasses."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from kvcellar import cli
from kvcellar.config import (DEFAULT_BLOCK_SIZE, DEFAULT_EXACT, ONE_BLOCK_PASS_BLOCK_SIZE, PREFILL_CHUNK_SIZE, RUNNING_KV_MEMORY_FRACTION,
                             CacheConfig,
                             EngineConfig, ServerSettings, size_text)  # fmt: skip
from kvcellar.models.demo import kvcellar_home

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture
def bare_cli(monkeypatch):
    """The parser as a user without a config file or KVCELLAR_* variables sees it."""
    monkeypatch.setattr(cli, "_CONFIG_FILE_VALUES", {})
    for name in list(__import__("os").environ):
        if name.startswith("KVCELLAR_") and name != "KVCELLAR_HOME":
            monkeypatch.delenv(name)
    return cli.build_parser()


def test_cli_without_flags_builds_the_dataclasses_defaults(bare_cli):
    args = bare_cli.parse_args(["generate", "--prompt", "x", "--model", "some-model"])
    config = cli._engine_config(args)
    # The command line's one deliberate difference: a disk tier in $KVCELLAR_HOME (Python's default has none).
    assert config.cache.cache_dir == str(kvcellar_home() / "kv-cache")
    assert dataclasses.replace(config, cache=dataclasses.replace(config.cache, cache_dir=None)) == EngineConfig("some-model")
    assert args.log_level == ServerSettings().log_level


def test_serve_without_flags_builds_the_default_server_settings(bare_cli):
    args = bare_cli.parse_args(["serve", "--model", "some-model"])
    assert cli._server_settings(args) == ServerSettings()


def _table_defaults(path: Path) -> dict[str, str]:
    """First flag of each row of the markdown tables whose header has a 'default' column -> that cell."""
    found: dict[str, str] = {}
    column = None
    for line in path.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells is None:
            column = None
        elif "default" in cells:
            column = cells.index("default")
        elif column is not None and not set(line) <= set("|- "):
            flag = re.match(r"`(--[a-z-]+)", cells[0])
            if flag:
                found[flag.group(1)] = cells[column]
    return found


CACHE, SERVER, ENGINE = CacheConfig(), ServerSettings(), EngineConfig("m")


def _on_off(value: bool) -> str:
    return "on" if value else "off"


EXPECTED = {
    "--device": f"`{ENGINE.device}`",
    "--dtype": f"`{ENGINE.dtype}`",
    "--block-size": f"{DEFAULT_BLOCK_SIZE['cpu']}; on CUDA {ONE_BLOCK_PASS_BLOCK_SIZE['cuda']} with `--exact` or for models "
                    "with sliding-window or recurrent layers",
    "--device-cache-size": f"`{size_text(CACHE.device_cache_bytes)}`",
    "--disk-cache-size": f"`{size_text(CACHE.disk_cache_bytes)}`",
    "--disk-tier": _on_off(CACHE.use_disk_tier),
    "--disk-write-queue-size": f"`{size_text(CACHE.disk_write_queue_bytes)}`",
    "--cost-model": _on_off(CACHE.cost_model),
    "--drain-timeout": f"{CACHE.drain_timeout_s:g}",
    "--host-cache-size": f"`{size_text(CACHE.host_cache_bytes)}`",
    "--host-tier": _on_off(CACHE.use_host_tier),
    "--tail-cache-entries": str(CACHE.max_partial_entries),
    "--exact": f"{_on_off(DEFAULT_EXACT['cpu'])} for CPU and MPS, {_on_off(DEFAULT_EXACT['cuda'])} on CUDA",
    "--prefill-schedule": f"`{ENGINE.prefill_schedule}`",
    "--no-cache": _on_off(not CACHE.enabled),
    "--log-level": f"`{SERVER.log_level}`",
    "--host": f"`{SERVER.host}`",
    "--port": f"`{SERVER.port}`",
    "--cache-salt": f"`{SERVER.default_salt!r}`".replace("'", '"'),
    "--metrics-public": _on_off(SERVER.metrics_public),
    "--max-request-bytes": f"`{size_text(SERVER.max_request_bytes)}`",
    "--remote-timeout": f"{CACHE.remote_timeout_s:g}",
    "--remote-prefix": f"`{CACHE.remote_key_prefix}`",
}
# Rows whose default is not one dataclass field's value: checked by what they must say.
DESCRIBED = {
    "--model": "demo model",
    "--threads": "torch default",
    "--cache-dir": "`$KVCELLAR_HOME/kv-cache`",
    "--prefill-chunk-size": f"one block; {PREFILL_CHUNK_SIZE['cpu']} on CPU and {PREFILL_CHUNK_SIZE['cuda']} on CUDA",
    "--api-key": "none",
    "--kv-budget": f"{RUNNING_KV_MEMORY_FRACTION:.0%} of the memory free after loading",
    "--remote-cache": "none",
    "--kv-events-endpoint": "off",
}


@pytest.mark.parametrize("page", ["configuration.md", "api.md"])
def test_docs_tables_quote_the_dataclasses_defaults(page):
    rows = _table_defaults(DOCS / page)
    assert rows, f"no option table found in {page}"
    for flag, cell in rows.items():
        assert flag in EXPECTED or flag in DESCRIBED, f"{page}: {flag} is in no list of this test: add it"
        if flag in EXPECTED:
            assert cell == EXPECTED[flag], f"{page}: {flag} says {cell!r}, config.py says {EXPECTED[flag]!r}"
        else:
            assert DESCRIBED[flag] in cell, f"{page}: {flag} says {cell!r}, expected it to say {DESCRIBED[flag]!r}"


def test_every_cli_option_of_serve_appears_in_a_docs_table(bare_cli):
    documented = set(_table_defaults(DOCS / "configuration.md")) | set(_table_defaults(DOCS / "api.md"))
    serve = next(action for action in bare_cli._subparsers._group_actions[0].choices.values() if action.prog.endswith("serve"))
    flags = {action.option_strings[0] for action in serve._actions if action.option_strings and action.dest != "help"}
    assert flags - documented == set()


def test_the_exact_default_said_for_cpu_holds_for_mps_too():
    # The help text and the docs name CPU and MPS together.
    assert DEFAULT_EXACT["mps"] == DEFAULT_EXACT["cpu"]
