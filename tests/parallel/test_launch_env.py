"""The torchrun environment for processes started without torchrun."""

from __future__ import annotations

import os
import socket

from moe_train.parallel.launch_env import ensure_single_process_env, free_port, torchrun_env

KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_torchrun_env_defaults_to_one_node():
    env = torchrun_env(3, 4, 29511)
    assert env == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "3",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29511",
    }
    two_nodes = torchrun_env(3, 4, 1, local_rank=1, local_world_size=2, master_addr="head")
    assert (two_nodes["LOCAL_RANK"], two_nodes["LOCAL_WORLD_SIZE"]) == ("1", "2")
    assert two_nodes["MASTER_ADDR"] == "head"


def test_single_process_env_fills_in_only_what_torchrun_did_not(monkeypatch):
    for k in KEYS:
        monkeypatch.delenv(k, raising=False)
    ensure_single_process_env()
    assert [os.environ[k] for k in KEYS[:4]] == ["0", "1", "0", "1"]
    assert int(os.environ["MASTER_PORT"]) > 0
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("MASTER_PORT", "1234")
    ensure_single_process_env()  # under torchrun: untouched
    assert (os.environ["RANK"], os.environ["MASTER_PORT"]) == ("2", "1234")
