"""Refused checkpoints: every part of a checkpoint is checked before anything loads.

Each protocol's checkpoint comes from a short run of the strategy's own protocol server part over
in-process nodes (the reference loop's link); a test mutates a copy, writes it back (``save_checkpoint``
re-signs it: the SHA-256 and, with the key set, the HMAC) and resumes a fresh strategy from it.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from hosfl_flower.checkpoint import (
    CONTRACT_FIELD,
    HMAC_FIELD,
    KEY_ENV,
    MAGIC,
    CheckpointError,
    checkpoint_path,
    read_checkpoint,
    save_checkpoint,
)
from hosfl_flower.config import resolve_run_config
from hosfl_flower.flower.strategy import HOSFLStrategy
from hosfl_flower.options import ConfigError
from hosfl_flower.protocols.base import NodeInfo
from hosfl_flower.recording import RunRecorder
from hosfl_flower.reference import InProcessLink, build_reference_nodes
from hosfl_flower.task import server_model_and_test

SAVED_ROUND = 2
BASE = {"num-server-rounds": 4, "clients-per-round": 2, "eval-every": 2, "seed": 5, "results-dir": ""}
RUNS = {
    "hosfl": {"strategy": "hosfl", "client.optimizer": "adamw", "server.optimizer": "adamw"},
    "zo-sfl": {"strategy": "zo-sfl", "client.optimizer": "adamw"},
    "frozen-client": {"strategy": "frozen-client"},
    "heron-sfl": {"strategy": "heron-sfl", "splitfed.local-steps": 1},
    "splitfed-v1": {"strategy": "splitfed-v1", "server.optimizer": "sgd", "server.momentum": 0.9, "splitfed.local-steps": 1},
    "splitfed-v2": {"strategy": "splitfed-v2", "server.optimizer": "sgd", "server.momentum": 0.9, "splitfed.local-steps": 1},
    "fedavg": {"strategy": "fedavg"},
    "cse-fsl": {"strategy": "cse-fsl", "cse-fsl.local-steps": 2, "cse-fsl.upload-every": 1},
    "fsl-sage": {"strategy": "fsl-sage", "fsl-sage.local-steps": 2, "fsl-sage.upload-every": 1, "fsl-sage.align-every": 2},
    "mu-splitfed": {"strategy": "mu-splitfed", "mu-splitfed.local-steps": 2},
}


@dataclass
class ShortRun:
    model: Any
    test: Any
    cfg: dict
    content: dict


_RUN_CACHE: dict[str, ShortRun] = {}


def short_run(name: str, tmp_path_factory) -> ShortRun:
    """The checkpoint of round 2 of a short run of ``name`` (built once per module and protocol)."""
    if name in _RUN_CACHE:
        return _RUN_CACHE[name]
    cfg = resolve_run_config({**BASE, **RUNS[name]})
    model, test = server_model_and_test(cfg)
    strategy = HOSFLStrategy(copy.deepcopy(model), test, cfg)
    clients = build_reference_nodes(cfg, 3)
    nodes = [NodeInfo(pid, pid, len(client.train)) for pid, client in clients.items()]
    for node in nodes:
        strategy.protocol.node_discovered(node, 0)
    strategy.evaluations[0] = strategy.evaluate(0)
    for rnd in range(1, SAVED_ROUND + 1):
        link = InProcessLink(strategy.name, clients, rnd)
        metrics = strategy.protocol.run_round(rnd, strategy.sample_nodes(rnd, nodes), link)
        row = {"round": rnd, **metrics, **link.account.as_metrics()}
        if rnd % cfg["eval-every"] == 0:
            strategy.evaluations[rnd] = strategy.evaluate(rnd)
            row.update(strategy.evaluations[rnd])
        strategy.history.append(row)
    directory = tmp_path_factory.mktemp(f"saved-{name}")
    save_checkpoint(directory, SAVED_ROUND, strategy.cfg, strategy.checkpoint_state())
    _RUN_CACHE[name] = ShortRun(model, test, dict(strategy.cfg), read_checkpoint(directory))
    return _RUN_CACHE[name]


def resign(directory: Path, content: Any) -> None:
    """Write ``content`` as it is (no coercion, unlike ``save_checkpoint``) with a valid header: its
    SHA-256 and length, and, with the key set, its HMAC."""
    buffer = io.BytesIO()
    torch.save(content, buffer)
    payload = buffer.getvalue()
    fields = [hashlib.sha256(payload).hexdigest(), str(len(payload))]
    if os.environ.get(KEY_ENV):
        fields.append(HMAC_FIELD + hmac.new(os.environ[KEY_ENV].encode(), payload, hashlib.sha256).hexdigest())
    directory.mkdir(parents=True, exist_ok=True)
    checkpoint_path(directory).write_bytes(MAGIC + " ".join(fields).encode() + b"\n" + payload)


def target(run: ShortRun, directory: Path, **extra) -> HOSFLStrategy:
    """A fresh strategy of the same run, resuming from ``directory``."""
    cfg = {**run.cfg, "resume": True, "checkpoint-dir": str(directory), **extra}
    return HOSFLStrategy(copy.deepcopy(run.model), run.test, cfg)


def snapshot(strategy: HOSFLStrategy) -> dict:
    """Everything a resume could change."""
    return copy.deepcopy({"state": strategy.checkpoint_state(), "model": strategy.model.state_dict()})


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def refused_and_unchanged(strategy: HOSFLStrategy, fragment: str) -> str:
    """``resume()`` raises a one-line ``CheckpointError`` containing ``fragment`` and changes nothing."""
    before = snapshot(strategy)
    with pytest.raises(CheckpointError) as caught:
        strategy.resume()
    message = str(caught.value)
    assert fragment in message, message
    assert "\n" not in message
    assert same(snapshot(strategy), before), "a refused resume changed the strategy"
    return message


def first_key(mapping):
    return next(iter(mapping))


def nan_first(tensors):
    name = first_key(tensors)
    tensors[name] = torch.full_like(tensors[name], float("nan"))


def double_first(tensors):
    name = first_key(tensors)
    tensors[name] = tensors[name].double()


def ledger_row(c, index=0):
    return list(c["state"]["protocol"]["ledger"][index])


def set_ledger(c, index, field, value):
    row = ledger_row(c, index)
    row[field] = value
    c["state"]["protocol"]["ledger"][index] = tuple(row)


def server_opt(c):
    return c["state"]["server"]["optimizer"]


def del_key(mapping, key):
    del mapping[key]


# (protocol, what is mutated, the mutation, a fragment of the refusal)
REFUSALS = [
    # the header fields and the containers
    ("hosfl", "round -3", lambda c: c.update(round=-3), "is of round -3: a checkpoint's round must be >= 1"),
    ("hosfl", "round 0", lambda c: c.update(round=0), "must be >= 1"),
    ("hosfl", "round a str", lambda c: c.update(round="2"), "round is a str, expected int"),
    ("hosfl", "round a bool", lambda c: c.update(round=True), "round is a bool, expected int"),
    ("hosfl", "round = num-server-rounds", lambda c: c.update(round=4), "nothing left to run with num-server-rounds=4"),
    ("hosfl", "round after num-server-rounds", lambda c: c.update(round=9), "nothing left to run"),
    ("hosfl", "config a list", lambda c: c.update(config=[]), "config is a list, expected dict"),
    ("hosfl", "state a list", lambda c: c.update(state=[]), "state is a list, expected dict"),
    ("hosfl", "a part missing", lambda c: del_key(c["state"], "schedule"), "checkpoint lacks schedule"),
    ("hosfl", "an unknown part", lambda c: c["state"].update(extra=1), "unexpected parts ['extra']"),
    ("hosfl", "reply-bound a dict", lambda c: c["state"].update({"reply-bound": {}}), "reply-bound is a dict, expected list"),
    ("hosfl", "reply-bound NaN", lambda c: c["state"].update({"reply-bound": [float("nan")]}), "reply-bound size is nan"),
    ("hosfl", "reply-bound negative", lambda c: c["state"].update({"reply-bound": [-1.0]}), "must be >= 0"),
    ("hosfl", "reply-bound too long", lambda c: c["state"].update({"reply-bound": [1.0] * 9}), "at most 8 are kept"),
    # segments
    ("hosfl", "server a list", lambda c: c["state"].update(server=[]), "checkpoint's server is a list, expected a dict"),
    ("hosfl", "server weights a list", lambda c: c["state"]["server"].update(weights=[]), "server segment is a list"),
    ("hosfl", "server weights NaN", lambda c: nan_first(c["state"]["server"]["weights"]), "has entries that are not finite"),
    ("hosfl", "server weight float64", lambda c: double_first(c["state"]["server"]["weights"]), "torch.float64, this model has"),
    (
        "hosfl",
        "client weights NaN",
        lambda c: nan_first(c["state"]["client"]),
        "client segment.0.0.weight has entries that are not",
    ),
    (
        "hosfl",
        "client weights inf",
        lambda c: c["state"]["client"]["0.0.bias"].fill_(float("inf")),
        "client segment.0.0.bias has entries that are not finite",
    ),
    ("hosfl", "client weight missing", lambda c: del_key(c["state"]["client"], "0.0.bias"), "does not fit this model"),
    ("hosfl", "client a list", lambda c: c["state"].update(client=[]), "client segment is a list"),
    # the server optimizer (AdamW moments and steps, SGD momentum)
    ("hosfl", "server optimizer a list", lambda c: c["state"]["server"].update(optimizer=[]), "server optimizer is a list"),
    (
        "hosfl",
        "AdamW moment of the wrong shape",
        lambda c: server_opt(c)["state"][0].update(exp_avg=torch.zeros(3)),
        "state of parameter 0.exp_avg is (3,) torch.float32, expected (64, 128)",
    ),
    (
        "hosfl",
        "AdamW moment NaN",
        lambda c: server_opt(c)["state"][1]["exp_avg"].fill_(float("nan")),
        "state of parameter 1.exp_avg has entries that are not finite",
    ),
    (
        "hosfl",
        "AdamW second moment negative",
        lambda c: server_opt(c)["state"][1]["exp_avg_sq"].fill_(-1.0),
        "exp_avg_sq has negative entries",
    ),
    (
        "hosfl",
        "AdamW step NaN",
        lambda c: server_opt(c)["state"][0].update(step=torch.tensor(float("nan"))),
        "step has entries that are not finite",
    ),
    (
        "hosfl",
        "AdamW step 0.5",
        lambda c: server_opt(c)["state"][0].update(step=torch.tensor(0.5)),
        "step is 0.5, expected a whole number >= 1",
    ),
    ("hosfl", "AdamW step a float", lambda c: server_opt(c)["state"][0].update(step=2.0), "step is a float, expected a tensor"),
    (
        "hosfl",
        "AdamW moment missing",
        lambda c: del_key(server_opt(c)["state"][0], "exp_avg_sq"),
        "has keys ['exp_avg', 'step'], AdamW keeps",
    ),
    (
        "hosfl",
        "state of an unknown parameter",
        lambda c: server_opt(c)["state"].update({99: dict(server_opt(c)["state"][0])}),
        "state for parameter 99",
    ),
    ("hosfl", "optimizer state a list", lambda c: server_opt(c).update(state=[]), "server optimizer state is a list"),
    ("hosfl", "param_groups a dict", lambda c: server_opt(c).update(param_groups={}), "has a dict parameter groups"),
    (
        "hosfl",
        "server lr NaN",
        lambda c: server_opt(c)["param_groups"][0].update(lr=float("nan")),
        "parameter group 0 has lr=nan, the run config gives",
    ),
    (
        "hosfl",
        "server optimizer maximizes",
        lambda c: server_opt(c)["param_groups"][0].update(maximize=True),
        "has maximize=True",
    ),
    (
        "hosfl",
        "param group of other parameters",
        lambda c: server_opt(c)["param_groups"][0].update(params=[0, 1]),
        "does not fit this model's server segment",
    ),
    (
        "splitfed-v2",
        "SGD momentum of the wrong shape",
        lambda c: server_opt(c)["state"][0].update(momentum_buffer=torch.zeros(2, 2)),
        "momentum_buffer is (2, 2) torch.float32",
    ),
    (
        "splitfed-v2",
        "SGD momentum NaN",
        lambda c: server_opt(c)["state"][0]["momentum_buffer"].fill_(float("nan")),
        "momentum_buffer has entries that are not finite",
    ),
    # the schedule, the RNG, the history
    ("hosfl", "schedule a list", lambda c: c["state"].update(schedule=[]), "schedule is a list"),
    (
        "hosfl",
        "schedule of another generator",
        lambda c: c["state"]["schedule"].update(bit_generator="MT19937"),
        "schedule is of generator 'MT19937', expected 'PCG64'",
    ),
    ("hosfl", "schedule state garbage", lambda c: c["state"]["schedule"].update(state="x"), "checkpoint's schedule is invalid"),
    ("hosfl", "torch RNG of the wrong dtype", lambda c: c["state"].update({"torch-rng": torch.zeros(5056)}), "torch-rng is"),
    ("hosfl", "torch RNG a list", lambda c: c["state"].update({"torch-rng": [1, 2]}), "torch-rng is a list"),
    ("hosfl", "history a dict", lambda c: c["state"].update(history={}), "history is a dict, expected list"),
    ("hosfl", "history row a list", lambda c: c["state"]["history"].__setitem__(0, [1]), "history row 0 is a list"),
    ("hosfl", "history row of another round", lambda c: c["state"]["history"][1].update(round=5), "row 1 is of round 5"),
    ("hosfl", "history too short", lambda c: c["state"]["history"].pop(), "history has 1 rows, its round is 2"),
    ("hosfl", "history value a tensor", lambda c: c["state"]["history"][0].update(loss=torch.zeros(1)), "loss is a Tensor"),
    ("hosfl", "evaluations a list", lambda c: c["state"].update(evaluations=[]), "evaluations is a list"),
    ("hosfl", "evaluation after the round", lambda c: c["state"]["evaluations"].update({7: {}}), "include round 7"),
    ("hosfl", "evaluation round a str", lambda c: c["state"]["evaluations"].update({"7": {}}), "round is a str"),
    ("hosfl", "skipped-in-a-row negative", lambda c: c["state"].update({"skipped-in-a-row": -1}), "must be >= 0"),
    ("hosfl", "skipped-in-a-row a str", lambda c: c["state"].update({"skipped-in-a-row": "0"}), "is a str"),
    # the protocol's state: the ledger
    ("hosfl", "protocol state a list", lambda c: c["state"].update(protocol=[]), "hosfl state is a list, expected a dict"),
    ("hosfl", "ledger missing", lambda c: del_key(c["state"]["protocol"], "ledger"), "lacks ledger"),
    ("hosfl", "ledger a dict", lambda c: c["state"]["protocol"].update(ledger={}), "the ledger is a dict"),
    ("hosfl", "ledger NaN v̄", lambda c: set_ledger(c, 0, 2, [float("nan")] * 2), "scalars must be a list of finite numbers"),
    ("hosfl", "ledger mu=0", lambda c: set_ledger(c, 0, 4, 0.0), "mu=0.0 must be a finite number > 0"),
    ("hosfl", "ledger mu NaN", lambda c: set_ledger(c, 1, 4, float("nan")), "ledger row 1 (round 2): mu=nan"),
    ("hosfl", "ledger mu a str", lambda c: set_ledger(c, 0, 4, "0.001"), "mu='0.001' must be a finite number"),
    ("hosfl", "ledger lr < 0", lambda c: set_ledger(c, 0, 3, -1.0), "lr=-1.0 must be a finite number >= 0"),
    ("hosfl", "ledger lr inf", lambda c: set_ledger(c, 0, 3, float("inf")), "lr=inf"),
    ("hosfl", "ledger seed a float", lambda c: set_ledger(c, 0, 1, [1.5, 2.0]), "seeds must be a list of ints"),
    ("hosfl", "ledger seed negative", lambda c: set_ledger(c, 0, 1, [-1, 2]), "seeds must be a list of ints in [0, 2**62)"),
    ("hosfl", "ledger seeds and scalars", lambda c: set_ledger(c, 0, 1, [1]), "1 seeds but 20 scalars"),
    ("hosfl", "ledger round -3", lambda c: set_ledger(c, 0, 0, -3), "(round -3): the round must be an int >= 1"),
    ("hosfl", "ledger rounds not increasing", lambda c: set_ledger(c, 1, 0, 1), "rounds must increase, round 1 after 1"),
    ("hosfl", "ledger after the checkpoint", lambda c: set_ledger(c, 1, 0, 3), "ledger ends at round 3, after"),
    ("hosfl", "ledger directions unknown", lambda c: set_ledger(c, 0, 5, "uniform"), "directions='uniform' must be one of"),
    ("hosfl", "ledger row too short", lambda c: c["state"]["protocol"]["ledger"].__setitem__(0, (1, [1])), "5 or 6 fields"),
    # the protocol's state: the client optimizer and the node versions
    (
        "hosfl",
        "client AdamW moment of the wrong shape",
        lambda c: c["state"]["protocol"]["client-optimizer"].update({"exp_avg.0": torch.zeros(3)}),
        "adamw exp_avg.0 is (3,) torch.float32, parameter 0 is (8, 1, 3, 3)",
    ),
    (
        "hosfl",
        "client AdamW moment NaN",
        lambda c: c["state"]["protocol"]["client-optimizer"]["exp_avg.1"].fill_(float("nan")),
        "adamw exp_avg.1 has entries that are not finite",
    ),
    (
        "hosfl",
        "client AdamW step a float",
        lambda c: c["state"]["protocol"]["client-optimizer"].update(step=torch.tensor(1.5)),
        "adamw step is () torch.float32",
    ),
    (
        "hosfl",
        "client AdamW moment unpaired",
        lambda c: del_key(c["state"]["protocol"]["client-optimizer"], "exp_avg_sq.2"),
        "moments of parameter 2 come without their pair",
    ),
    (
        "hosfl",
        "client AdamW moment of no parameter",
        lambda c: c["state"]["protocol"]["client-optimizer"].update(
            {"exp_avg.40": torch.zeros(1), "exp_avg_sq.40": torch.zeros(1)}
        ),
        "there are 6 parameters",
    ),
    ("hosfl", "client optimizer a list", lambda c: c["state"]["protocol"].update({"client-optimizer": []}), "is a list"),
    ("frozen-client", "sgd client state", lambda c: c["state"]["protocol"].update({"client-optimizer": {"x": 1}}), "stateless"),
    ("hosfl", "node-sync a list", lambda c: c["state"]["protocol"].update({"node-sync": []}), "node-sync is a list"),
    (
        "hosfl",
        "node ahead of the ledger",
        lambda c: c["state"]["protocol"]["node-sync"].update({0: (99, False)}),
        "applied round 99 must be an int in 0..2",
    ),
    ("hosfl", "node repair flag", lambda c: c["state"]["protocol"]["node-sync"].update({0: (1, "no")}), "needs-repair is a str"),
    (
        "zo-sfl",
        "zo-sfl ledger mu=0",
        lambda c: set_ledger(c, 0, 4, 0.0),
        "zo-sfl state does not fit: ledger row 0 (round 1): mu=0.0",
    ),
    # HERON's auxiliary head
    ("heron-sfl", "auxiliary head NaN", lambda c: nan_first(c["state"]["protocol"]["aux-head"]), "auxiliary head."),
    (
        "heron-sfl",
        "auxiliary head of the wrong shape",
        lambda c: c["state"]["protocol"]["aux-head"].update({first_key(c["state"]["protocol"]["aux-head"]): torch.zeros(1)}),
        "auxiliary head.",
    ),
    ("heron-sfl", "heron state a list", lambda c: c["state"].update(protocol=[]), "heron-sfl state is a list"),
    ("heron-sfl", "heron state without the head", lambda c: c["state"].update(protocol={}), "expected exactly ['aux-head']"),
    # FSL-SAGE's stored uploads, MU-SplitFed's scalar bound
    ("fsl-sage", "fsl-sage state without the uploads", lambda c: c["state"]["protocol"].pop("buffer"), "'aux-head', 'buffer'"),
    (
        "fsl-sage",
        "stored upload NaN",
        lambda c: c["state"]["protocol"]["buffer"][0]["z"].view(-1).__setitem__(0, float("nan")),
        "stored upload 0.z",
    ),
    (
        "fsl-sage",
        "stored upload without labels",
        lambda c: c["state"]["protocol"]["buffer"][0].pop("labels"),
        "stored upload 0 is not a batch",
    ),
    ("mu-splitfed", "scalar bound negative", lambda c: c["state"]["protocol"].update({"scalar-bound": [-1.0]}), "scalar-bound"),
]


@pytest.mark.parametrize("name,mutate,fragment", [(n, m, f) for n, _, m, f in REFUSALS], ids=[r[1] for r in REFUSALS])
def test_a_checkpoint_that_does_not_fit_is_refused_before_anything_loads(name, mutate, fragment, tmp_path, tmp_path_factory):
    run = short_run(name, tmp_path_factory)
    content = copy.deepcopy(run.content)
    mutate(content)
    resign(tmp_path, content)
    refused_and_unchanged(target(run, tmp_path), fragment)


@pytest.mark.parametrize("name", list(RUNS))
def test_a_checkpoint_of_a_short_run_passes_every_check_and_loads(name, tmp_path, tmp_path_factory):
    run = short_run(name, tmp_path_factory)
    content = run.content
    save_checkpoint(tmp_path, content["round"], content["config"], content["state"])
    strategy = target(run, tmp_path)
    assert strategy.resume() == SAVED_ROUND
    assert same(strategy.checkpoint_state()["client"], content["state"]["client"])
    assert [row["round"] for row in strategy.history] == [1, 2]
    # the reply bound remembers what it had accepted, so a resumed run rejects what the uninterrupted one would
    saved = content["state"]["reply-bound"]
    assert list(strategy.protocol.reply_bound.history) == saved
    assert saved or name == "frozen-client"  # the frozen client has no replies the bound sizes


def test_a_checkpoint_without_the_reply_bound_history_loads_with_an_empty_one(tmp_path, tmp_path_factory):
    run = short_run("hosfl", tmp_path_factory)
    content = copy.deepcopy(run.content)
    del content["state"]["reply-bound"]  # as an earlier version wrote it
    save_checkpoint(tmp_path, content["round"], content["config"], content["state"])
    strategy = target(run, tmp_path)
    assert strategy.resume() == SAVED_ROUND and not strategy.protocol.reply_bound.history


def test_the_server_given_as_a_list_is_a_checkpoint_error_not_an_attribute_error(tmp_path, tmp_path_factory):
    run = short_run("hosfl", tmp_path_factory)
    content = copy.deepcopy(run.content)
    content["state"]["server"] = [content["state"]["server"]]
    save_checkpoint(tmp_path, content["round"], content["config"], content["state"])
    refused_and_unchanged(target(run, tmp_path), "server is a list")


def test_a_load_that_fails_halfway_is_rolled_back(tmp_path, tmp_path_factory, monkeypatch):
    run = short_run("hosfl", tmp_path_factory)
    save_checkpoint(tmp_path, run.content["round"], run.content["config"], run.content["state"])
    strategy = target(run, tmp_path)

    load_state, calls = strategy.protocol.load_state, []

    def fail_once(state):  # the protocol's part loads last: θ_s, θ_c, the schedule and the history are in by then
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("disk on fire")
        load_state(state)

    monkeypatch.setattr(strategy.protocol, "load_state", fail_once)
    refused_and_unchanged(strategy, "does not load: disk on fire")


# --------------------------------------------------------------------------- the keyed digest
def test_with_the_key_set_only_checkpoints_signed_with_it_load(tmp_path, tmp_path_factory, monkeypatch):
    run = short_run("hosfl", tmp_path_factory)
    content = run.content
    unsigned, signed, other = tmp_path / "unsigned", tmp_path / "signed", tmp_path / "other"
    monkeypatch.delenv(KEY_ENV, raising=False)
    save_checkpoint(unsigned, content["round"], content["config"], content["state"])
    monkeypatch.setenv(KEY_ENV, "the right key")
    save_checkpoint(signed, content["round"], content["config"], content["state"])
    assert HMAC_FIELD.encode() in checkpoint_path(signed).read_bytes().splitlines()[1]
    assert target(run, signed).resume() == SAVED_ROUND
    refused_and_unchanged(target(run, unsigned), f"carries no HMAC, and {KEY_ENV} is set")
    monkeypatch.setenv(KEY_ENV, "another key")
    save_checkpoint(other, content["round"], content["config"], content["state"])
    monkeypatch.setenv(KEY_ENV, "the right key")
    refused_and_unchanged(target(run, other), "its HMAC does not match")
    monkeypatch.delenv(KEY_ENV)
    assert target(run, signed).resume() == SAVED_ROUND  # without the key, the HMAC cannot be checked


def test_a_payload_altered_and_its_sha256_recomputed_fails_the_hmac(tmp_path, tmp_path_factory, monkeypatch):
    run = short_run("hosfl", tmp_path_factory)
    monkeypatch.setenv(KEY_ENV, "the right key")
    good, forged = tmp_path / "good", tmp_path / "forged"
    content = run.content
    save_checkpoint(good, content["round"], content["config"], content["state"])
    altered = copy.deepcopy(content)
    altered["state"]["client"]["0.0.bias"].add_(1.0)
    monkeypatch.delenv(KEY_ENV)
    save_checkpoint(forged, altered["round"], altered["config"], altered["state"])  # a valid SHA-256, no HMAC
    payload = checkpoint_path(forged).read_bytes().split(b"\n", 2)[2]
    mac = checkpoint_path(good).read_bytes().splitlines()[1].split()[2]  # the HMAC of the genuine payload
    header = f"{hashlib.sha256(payload).hexdigest()} {len(payload)} ".encode() + mac + b"\n"
    checkpoint_path(forged).write_bytes(MAGIC + header + payload)
    monkeypatch.setenv(KEY_ENV, "the right key")
    refused_and_unchanged(target(run, forged), "is not authentic: its HMAC does not match")


@pytest.mark.parametrize("contract", [None, 1, 3])
def test_a_checkpoint_of_another_directions_contract_is_refused(contract, tmp_path, tmp_path_factory):
    """A checkpoint written before the one-stream-per-seed directions (no contract field, i.e. contract 1) or
    under any other contract is refused in one line, before anything loads: its ledger would replay other θ_c."""
    run = short_run("hosfl", tmp_path_factory)
    content = dict(run.content)
    payload = {"round": content["round"], "config": content["config"], "state": content["state"]}
    if contract is not None:
        payload[CONTRACT_FIELD] = contract
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    path = checkpoint_path(tmp_path / "old")
    path.parent.mkdir(parents=True)
    path.write_bytes(MAGIC + f"{hashlib.sha256(data).hexdigest()} {len(data)}\n".encode() + data)
    shown = 1 if contract is None else contract
    message = refused_and_unchanged(target(run, path.parent), f"was written under directions contract {shown}")
    assert "contract 2 (one stream per seed)" in message
    save_checkpoint(tmp_path / "new", content["round"], content["config"], content["state"])
    assert target(run, tmp_path / "new").resume() == SAVED_ROUND


# --------------------------------------------------------------------------- the results of a refused resume
def test_a_refused_resume_leaves_the_results_of_the_earlier_run_byte_identical(tmp_path, tmp_path_factory):
    run = short_run("hosfl", tmp_path_factory)
    checkpoints, results = tmp_path / "checkpoints", tmp_path / "results"
    content = copy.deepcopy(run.content)
    nan_first(content["state"]["server"]["weights"])
    save_checkpoint(checkpoints, content["round"], content["config"], content["state"])
    results.mkdir()
    earlier = b'{"round": 1, "loss": 2.3}\n{"round": 2, "loss": 2.1}\n'
    (results / "rounds.jsonl").write_bytes(earlier)
    strategy = target(run, checkpoints, **{"results-dir": str(results)})
    with pytest.raises(CheckpointError, match="not finite"):
        strategy.start(grid=None)  # refused before any node is asked anything
    assert (results / "rounds.jsonl").read_bytes() == earlier
    assert sorted(p.name for p in results.iterdir()) == ["rounds.jsonl"]


def test_the_recorder_writes_nothing_until_it_is_restored_or_records(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "rounds.jsonl").write_text("earlier\n")
    recorder = RunRecorder("hosfl", results, 4)
    assert (results / "rounds.jsonl").read_text() == "earlier\n"
    recorder.restore([{"round": 1, "loss": 1.0}])
    assert (results / "rounds.jsonl").read_text() == '{"round": 1, "loss": 1.0}\n'
    recorder.record({"round": 2, "loss": 0.5})
    assert len((results / "rounds.jsonl").read_text().splitlines()) == 2
    fresh = RunRecorder("hosfl", tmp_path / "new", 4)
    assert not (tmp_path / "new").exists()
    fresh.record({"round": 1})
    assert (tmp_path / "new" / "rounds.jsonl").read_text() == '{"round": 1}\n'


# --------------------------------------------------------------------------- checkpoint-dir, checked at the start
def _file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("x")
    return path


BAD_DIRECTORIES = [
    ("a NUL byte", lambda tmp: str(tmp / "check\x00points"), "contains a NUL byte"),
    ("a file", lambda tmp: str(_file(tmp)), "exists and is not a directory"),
    ("under a file", lambda tmp: str(_file(tmp) / "checkpoints"), "cannot create directory"),
]


@pytest.mark.parametrize("make,fragment", [(m, f) for _, m, f in BAD_DIRECTORIES], ids=[b[0] for b in BAD_DIRECTORIES])
def test_a_bad_checkpoint_dir_fails_before_round_one(make, fragment, tmp_path, tmp_path_factory):
    run = short_run("hosfl", tmp_path_factory)
    cfg = {**run.cfg, "checkpoint-every": 2, "checkpoint-dir": make(tmp_path)}
    strategy = HOSFLStrategy(copy.deepcopy(run.model), run.test, cfg)
    with pytest.raises(ConfigError) as caught:
        strategy.start(grid=None)  # no node is asked anything: the check comes first
    assert fragment in str(caught.value) and "checkpoint-dir" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any directory")
def test_an_unwritable_checkpoint_dir_fails_before_round_one(tmp_path, tmp_path_factory):
    run = short_run("hosfl", tmp_path_factory)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        strategy = HOSFLStrategy(
            copy.deepcopy(run.model), run.test, {**run.cfg, "checkpoint-every": 2, "checkpoint-dir": str(locked)}
        )
        with pytest.raises(ConfigError, match="is not writable"):
            strategy.start(grid=None)
    finally:
        locked.chmod(0o700)


def test_resuming_from_a_checkpoint_dir_with_a_nul_byte_fails_with_one_line(tmp_path, tmp_path_factory):
    run = short_run("hosfl", tmp_path_factory)
    strategy = target(run, Path(str(tmp_path) + "\x00x"))
    with pytest.raises(ConfigError, match="contains a NUL byte"):
        strategy.start(grid=None)
