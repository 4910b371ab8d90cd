"""Atomic, verified checkpoints of a run's server-side state (docs/protocols.md, "Checkpoints": the ledger is part of it).

A checkpoint file is a header line, the SHA-256 and length of the payload (and, when the
environment variable ``HOSFL_FLOWER_CHECKPOINT_KEY`` is set, an HMAC-SHA256 of the payload keyed by
it), then the payload (a ``torch.save`` of the round, the run config and the strategy's state,
loaded back with ``weights_only=True``). It is written to a temporary file in the same directory,
flushed to disk and renamed over the previous one, so a crash leaves either the old or the new
checkpoint, never a mix. Loading verifies length, digest and (with the key set) the HMAC before
unpickling anything, then the type of every container and the round, and checks that the
checkpoint was written by the same run configuration; any doubt raises :class:`CheckpointError`
with one line naming what is wrong. The SHA-256 catches corruption; only the HMAC stops someone
who can write the file from handing the run a state of their choosing.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .zo.directions import DIRECTIONS_CONTRACT, check_contract

MAGIC = b"HOSFL-FLOWER-CHECKPOINT 1\n"
FILE_NAME = "checkpoint.pt"
KEY_ENV = "HOSFL_FLOWER_CHECKPOINT_KEY"
"""Environment variable holding the key of the checkpoints' HMAC-SHA256 (unset or empty: no HMAC)."""
HMAC_FIELD = "hmac-sha256="
CONTRACT_FIELD = "directions-contract"
"""Payload key naming the directions contract the run's ledger was drawn under (absent: contract 1)."""

RESUMABLE_KEYS = frozenset(
    {
        "num-server-rounds",
        "checkpoint-every",
        "checkpoint-dir",
        "resume",
        "results-dir",
        "round-timeout",
        "eval-every",
        "eval-batch-size",
        "final-sync",
        "min-nodes",
        "max-skipped-rounds",
        "split-server.placement",
        "split-server.device",
        "split-server.num-gpus",
        "split-server.ray-address",
        "split-server.num-cpus",
        "client.device",
    }
)
"""Run-config keys a resumed run may change (a checkpoint holds CPU tensors, so it resumes on any device);
every other key must equal the checkpoint's."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, truncated, or belongs to a different run."""


def checkpoint_path(directory: str | Path) -> Path:
    """The checkpoint file inside ``directory``."""
    return Path(directory) / FILE_NAME


def checkpoint_key() -> bytes | None:
    """The HMAC key from :data:`KEY_ENV` (``None`` when it is unset or empty)."""
    key = os.environ.get(KEY_ENV, "")
    return key.encode() if key else None


def _hmac(key: bytes, payload: bytes) -> str:
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


def save_checkpoint(directory: str | Path, server_round: int, config: Mapping[str, Any], state: Mapping[str, Any]) -> Path:
    """Write the checkpoint of ``server_round`` atomically (with an HMAC when :data:`KEY_ENV` is set); return its path."""
    buffer = io.BytesIO()
    content = {"round": int(server_round), "config": dict(config), "state": dict(state), CONTRACT_FIELD: DIRECTIONS_CONTRACT}
    torch.save(content, buffer)
    payload = buffer.getvalue()
    fields = [hashlib.sha256(payload).hexdigest(), str(len(payload))]
    key = checkpoint_key()
    if key is not None:
        fields.append(HMAC_FIELD + _hmac(key, payload))
    header = MAGIC + (" ".join(fields) + "\n").encode()
    target = checkpoint_path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".checkpoint-", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(header)
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def read_checkpoint(directory: str | Path) -> dict[str, Any]:
    """Read and verify a checkpoint: ``{"round", "config", "state"}``; raise :class:`CheckpointError`.

    With :data:`KEY_ENV` set, a checkpoint without an HMAC, or with one made by another key, is refused.
    """
    path = checkpoint_path(directory)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint to resume from: {path} does not exist")
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{path} is not a hosfl-flower checkpoint (bad header)")
    line_end = data.find(b"\n", len(MAGIC))
    try:
        if line_end < 0:
            raise ValueError
        fields = data[len(MAGIC) : line_end].decode("ascii").split()
        if len(fields) not in (2, 3) or (len(fields) == 3 and not fields[2].startswith(HMAC_FIELD)):
            raise ValueError
        digest, length = fields[0], int(fields[1])
        mac = fields[2][len(HMAC_FIELD) :] if len(fields) == 3 else None
    except ValueError:
        raise CheckpointError(f"{path} is corrupt (unreadable header)") from None
    payload = data[line_end + 1 :]
    if len(payload) != length:
        raise CheckpointError(f"{path} is truncated or corrupt: payload of {len(payload)} bytes, expected {length}")
    if not hmac.compare_digest(hashlib.sha256(payload).hexdigest(), digest):
        raise CheckpointError(f"{path} is corrupt: its SHA-256 does not match")
    key = checkpoint_key()
    if key is not None:
        if mac is None:
            raise CheckpointError(f"{path} carries no HMAC, and {KEY_ENV} is set: refusing an unauthenticated checkpoint")
        if not hmac.compare_digest(_hmac(key, payload), mac):
            raise CheckpointError(f"{path} is not authentic: its HMAC does not match the key in {KEY_ENV}")
    try:
        content = torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the file cannot be trusted
        raise CheckpointError(f"{path} does not load: {one_line(error)}") from None
    if not isinstance(content, dict) or not {"round", "config", "state"} <= set(content):
        raise CheckpointError(f"{path} lacks round, config or state")
    check_type(f"checkpoint {path}'s round", content["round"], int)
    check_type(f"checkpoint {path}'s config", content["config"], dict)
    if not all(isinstance(key, str) for key in content["config"]):
        raise CheckpointError(f"checkpoint {path}'s config has keys that are not strings")
    check_type(f"checkpoint {path}'s state", content["state"], dict)
    try:
        check_contract(content.get(CONTRACT_FIELD), f"checkpoint {path}")
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    return content


def check_round(path: str | Path, saved_round: Any, num_rounds: int) -> int:
    """The checkpoint's round, if it leaves rounds to run: an int with ``1 <= round < num_rounds``."""
    check_type(f"checkpoint {path}'s round", saved_round, int)
    if saved_round < 1:
        raise CheckpointError(f"checkpoint {path} is of round {saved_round}: a checkpoint's round must be >= 1")
    if saved_round >= num_rounds:
        raise CheckpointError(
            f"checkpoint {path} is of round {saved_round}: nothing left to run with num-server-rounds={num_rounds}"
        )
    return saved_round


def check_same_run(
    path: str | Path, saved: Mapping[str, Any], config: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
) -> None:
    """Raise :class:`CheckpointError` naming every key (outside :data:`RESUMABLE_KEYS`) that differs.

    A key only one side has (a protocol registered in one process and not the other) counts as its
    default in ``defaults``.
    """
    defaults = defaults or {}
    keys = sorted((set(saved) | set(config)) - RESUMABLE_KEYS)
    differing = [key for key in keys if saved.get(key, defaults.get(key)) != config.get(key, defaults.get(key))]
    if differing:
        shown = ", ".join(f"{key}={saved.get(key)!r} there, {config.get(key)!r} here" for key in differing[:4])
        more = f" (and {len(differing) - 4} more)" if len(differing) > 4 else ""
        raise CheckpointError(f"checkpoint {path} belongs to a different run: {shown}{more}")


# ---------------------------------------------------------------------- checks of a checkpoint's contents
def one_line(error: BaseException | str) -> str:
    """An error's message on one line (what a refusal shows)."""
    return " ".join(str(error).split()) or type(error).__name__


def type_name(value: Any) -> str:
    """``a list``, ``an int``: what a refusal says a value is."""
    name = type(value).__name__
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


def check_type(what: str, value: Any, kind: type | tuple[type, ...]) -> None:
    """:class:`CheckpointError` unless ``value`` is a ``kind`` (``bool`` never counts as ``int`` or ``float``)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        wanted = " or ".join(k.__name__ for k in kinds)
        raise CheckpointError(f"{what} is {type_name(value)}, expected {wanted}")


def check_number(what: str, value: Any, *, integer: bool = False, minimum: float | None = None, positive: bool = False) -> None:
    """:class:`CheckpointError` unless ``value`` is a finite number (an int if ``integer``) within bounds."""
    check_type(what, value, int if integer else (int, float))
    if not math.isfinite(value):
        raise CheckpointError(f"{what} is {value!r}, not finite")
    if minimum is not None and value < minimum:
        raise CheckpointError(f"{what} is {value!r}, must be >= {minimum}")
    if positive and value <= 0:
        raise CheckpointError(f"{what} is {value!r}, must be > 0")


def check_tensor(
    what: str, value: Any, shape: Sequence[int] | None = None, dtype: torch.dtype | None = None, *, nonnegative: bool = False
) -> None:
    """:class:`CheckpointError` unless ``value`` is a dense CPU-loadable tensor of ``shape`` and ``dtype``
    whose entries are finite (and ``>= 0`` if ``nonnegative``)."""
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{what} is {type_name(value)}, expected a tensor")
    if value.layout != torch.strided or value.device.type == "meta":
        raise CheckpointError(f"{what} is a {value.layout} tensor on {value.device}, expected a dense tensor")
    if (shape is not None and tuple(value.shape) != tuple(shape)) or (dtype is not None and value.dtype != dtype):
        expected = f"{tuple(shape) if shape is not None else tuple(value.shape)} {dtype or value.dtype}"
        raise CheckpointError(f"{what} is {tuple(value.shape)} {value.dtype}, expected {expected}")
    if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
        raise CheckpointError(f"{what} has entries that are not finite")
    if nonnegative and bool((value < 0).any()):
        raise CheckpointError(f"{what} has negative entries")


def check_tensors(what: str, saved: Any, current: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`CheckpointError` unless ``saved`` is a dict with exactly ``current``'s keys, shapes
    and dtypes, every entry finite."""
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"checkpoint's {what} is {type_name(saved)}, expected a dict of tensors")
    if set(saved) != set(current):
        missing = sorted(set(current) - set(saved), key=str)[:3]
        extra = sorted(set(saved) - set(current), key=str)[:3]
        raise CheckpointError(f"checkpoint's {what} does not fit this model (missing {missing}, unexpected {extra})")
    for key, tensor in current.items():
        value = saved[key]
        if not isinstance(value, torch.Tensor) or value.shape != tensor.shape or value.dtype != tensor.dtype:
            got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(f"checkpoint's {what}.{key} is {got}, this model has {tuple(tensor.shape)} {tensor.dtype}")
        check_tensor(f"checkpoint's {what}.{key}", value)


OPTIMIZER_STATE_KEYS: dict[str, tuple[str, ...]] = {
    "SGD": ("momentum_buffer",),
    "AdamW": ("step", "exp_avg", "exp_avg_sq"),
    "Adam": ("step", "exp_avg", "exp_avg_sq"),
}
"""The per-parameter state a ``torch.optim`` optimizer keeps once it has stepped a parameter."""

NONNEGATIVE_STATE = frozenset({"exp_avg_sq", "max_exp_avg_sq"})


def check_optimizer_state(what: str, saved: Any, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> None:
    """:class:`CheckpointError` unless ``saved`` (a ``state_dict()``) fits ``optimizer``, a fresh
    optimizer over ``params`` built as the run config says: the same parameter groups and
    hyper-parameters, and for each stepped parameter the keys that optimizer keeps, each a finite
    tensor of the parameter's shape and dtype (step counters: finite integral scalars >= 1;
    second moments >= 0)."""
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"checkpoint's {what} is {type_name(saved)}, expected a dict")
    if set(saved) != {"state", "param_groups"}:
        raise CheckpointError(f"checkpoint's {what} has keys {sorted(saved, key=str)}, expected ['param_groups', 'state']")
    current = optimizer.state_dict()["param_groups"]
    groups = saved["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(current):
        count = len(groups) if isinstance(groups, list) else type_name(groups)
        raise CheckpointError(f"checkpoint's {what} has {count} parameter groups, this model's server segment {len(current)}")
    for number, (group, expected) in enumerate(zip(groups, current)):
        where = f"checkpoint's {what} parameter group {number}"
        if not isinstance(group, Mapping):
            raise CheckpointError(f"{where} is {type_name(group)}, expected a dict")
        if group.get("params") != expected["params"]:
            raise CheckpointError(f"{where} does not fit this model's server segment (parameters {group.get('params')!r})")
        unknown = sorted(set(group) - set(expected), key=str)
        if unknown:
            raise CheckpointError(f"{where} has unknown settings {unknown[:3]}")
        for key, value in group.items():
            if key != "params" and (type(value) is not type(expected[key]) or value != expected[key]):
                raise CheckpointError(f"{where} has {key}={value!r}, the run config gives {expected[key]!r}")
    state = saved["state"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint's {what} state is {type_name(state)}, expected a dict")
    required = OPTIMIZER_STATE_KEYS.get(type(optimizer).__name__)
    if type(optimizer).__name__ == "SGD" and not current[0].get("momentum"):
        required = ()
    for index, entry in state.items():
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(params):
            raise CheckpointError(f"checkpoint's {what} has state for parameter {index!r}, the server segment has {len(params)}")
        where = f"checkpoint's {what} state of parameter {index}"
        if not isinstance(entry, Mapping):
            raise CheckpointError(f"{where} is {type_name(entry)}, expected a dict")
        if required is not None and set(entry) != set(required):
            kept = f"{type(optimizer).__name__} keeps {sorted(required)}"
            raise CheckpointError(f"{where} has keys {sorted(entry, key=str)}, {kept}")
        param = params[index]
        for key, value in entry.items():
            if key == "step":
                check_tensor(f"{where}.step", value, ())
                if not value.is_floating_point() and value.dtype not in (torch.int32, torch.int64):
                    raise CheckpointError(f"{where}.step is {value.dtype}, expected a number")
                step = float(value)
                if step < 1 or step != int(step):
                    raise CheckpointError(f"{where}.step is {step!r}, expected a whole number >= 1")
            elif key == "momentum_buffer" and value is None:
                continue
            else:
                check_tensor(f"{where}.{key}", value, tuple(param.shape), param.dtype, nonnegative=key in NONNEGATIVE_STATE)


# ---------------------------------------------------------------------- the checkpoint directory
def check_directory(key: str, value: str, writable: bool) -> Path:
    """Fail with one line (:class:`~hosfl_flower.options.ConfigError`) unless ``value`` can be the
    checkpoint directory: no NUL byte, not a file, and (``writable``) a directory this process can
    create and write in (checked by creating and removing a probe file). A directory that does not
    exist is created only when ``writable``; resuming from it is then refused for lack of a checkpoint."""
    from .options import ConfigError

    if "\x00" in value:
        raise ConfigError(key, value, "contains a NUL byte")
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(key, value, f"{path} exists and is not a directory")
    if not writable:
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(key, value, f"cannot create directory {path} ({error.strerror or one_line(error)})") from None
    try:
        handle, probe = tempfile.mkstemp(prefix=".checkpoint-probe-", dir=path)
    except OSError as error:
        raise ConfigError(key, value, f"directory {path} is not writable ({error.strerror or one_line(error)})") from None
    os.close(handle)
    Path(probe).unlink(missing_ok=True)
    return path
