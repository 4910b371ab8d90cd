"""SplitFed's client part: the node's handlers of ``train.splitfed_smash`` and ``train.splitfed_grad``,
and the first-order client step of split learning.

Between the messages of a round the node keeps its current ``θ_c`` in its
:class:`~hosfl_flower.node.store.WeightStore` (the node state holds only its tag, ``(round,
fingerprint)``) and the step's inputs as per-round scratch, so no autograd graph outlives a message.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
from flwr.app import ConfigRecord

from ...models import SplitModel
from ...node.client import HOSFLClient, OutOfSyncError
from ...node.store import WeightTag
from ...zo import fingerprint
from ..messages import Payload, SmashedBatch
from ..registry import Handler
from .config import SplitFedSettings
from .messages import SplitFedGradReply, SplitFedGradRequest, SplitFedSmashReply, SplitFedSmashRequest

if TYPE_CHECKING:
    from ...memory import MemoryCase

STATE_WEIGHTS = "hosfl.splitfed"
"""Node-state key of the tag of the node's current SplitFed ``θ_c`` (the tensors are in the store)."""


def client_step(model: SplitModel, inputs: Mapping[str, torch.Tensor], activation_grad: torch.Tensor, lr: float) -> None:
    """One first-order client step of split learning: recompute ``z``, ``z.backward(λ)``, SGD at ``lr``."""
    model.client.train()
    params = model.client_parameters()
    for param in params:
        param.grad = None
    z = model.smash(inputs)["z"]
    z.backward(activation_grad)
    with torch.no_grad():
        for param in params:
            if param.grad is not None:
                param.add_(param.grad, alpha=-lr)
                param.grad = None
    model.client.eval()


def keep_weights(client: HOSFLClient, server_round: int) -> None:
    """Keep the model's ``θ_c`` as the node's weights of ``server_round``: tensors in the store, tag in the state."""
    state = client.model.client_state()
    tag = (int(server_round), fingerprint(state.values()))
    client.store.put(client.run_id, client.node_id, tag, state)
    client.store.mark(client.model, tag)
    client.state[STATE_WEIGHTS] = ConfigRecord({"round": tag[0], "fingerprint": tag[1]})


def _weights_tag(client: HOSFLClient) -> WeightTag | None:
    record = client.state.get(STATE_WEIGHTS)
    if not isinstance(record, ConfigRecord):
        return None
    server_round, fp = record.get("round"), record.get("fingerprint")
    return (server_round, fp) if isinstance(server_round, int) and isinstance(fp, str) else None


def load_weights(client: HOSFLClient, server_round: int) -> None:
    """Load the node's ``θ_c`` of ``server_round`` into the (shared) model; :class:`OutOfSyncError` if it has none."""
    tag = _weights_tag(client)
    if tag is None or tag[0] != server_round:
        raise OutOfSyncError(f"no client segment received for round {server_round}")
    if client.store.holds(client.model, tag):
        return
    tensors = client.store.get(client.run_id, client.node_id, tag)
    if tensors is None:
        raise OutOfSyncError(f"the client segment of round {server_round} is no longer stored on this node")
    client.model.load_client_state(tensors)
    client.store.mark(client.model, tag)


@torch.no_grad()
def smash(client: HOSFLClient, request: SplitFedSmashRequest, server_round: int) -> SplitFedSmashReply:
    """Adopt the round's ``θ_c`` if sent, draw step ``request.step``'s minibatch and return ``z = f_c(x)``."""
    start = time.perf_counter()
    if request.weights is not None:
        client.model.load_client_state(request.weights)
        keep_weights(client, server_round)
    else:
        load_weights(client, server_round)
    batch = client.draw_batch(server_round, request.step)
    smashed = client.smash(batch.inputs)
    client.keep("splitfed", (server_round, request.step), {f"input.{k}": v for k, v in batch.inputs.items()})
    return SplitFedSmashReply(SmashedBatch(smashed, batch.labels), compute_seconds=time.perf_counter() - start)


def backward(client: HOSFLClient, request: SplitFedGradRequest, server_round: int) -> SplitFedGradReply:
    """Backpropagate ``λ`` through the client segment and take an SGD step (:func:`client_step`).

    The forward pass is recomputed from the kept inputs. After the round's last step the reply
    carries the trained ``θ_c``; before it, the node keeps ``θ_c`` for the next step.
    """
    start = time.perf_counter()
    kept = client.take("splitfed", (server_round, request.step))
    load_weights(client, server_round)
    inputs = {k[len("input.") :]: v for k, v in kept.items()}
    client_step(client.compute_model(), client.to_compute(inputs), client.to_compute(request.activation_grad), request.lr)
    client.commit()  # a device step's θ_c becomes the node's canonical CPU θ_c
    weights = None
    if request.last:
        weights = {k: v.clone() for k, v in client.model.client_state().items()}
    else:
        keep_weights(client, server_round)
    return SplitFedGradReply(weights, compute_seconds=time.perf_counter() - start)


HANDLERS: dict[type[Payload], Handler] = {SplitFedSmashRequest: smash, SplitFedGradRequest: backward}


def memory_step(case: MemoryCase) -> Callable[[], SplitFedGradReply]:
    """One SplitFed step of a node for the memory benchmark: ``train.splitfed_smash`` receiving ``θ_c``,
    then ``train.splitfed_grad`` with a random ``λ`` (the round's last step)."""
    lr = SplitFedSettings.from_config(case.cfg).lr

    def step() -> SplitFedGradReply:
        client = case.new_client()
        reply = smash(client, SplitFedSmashRequest(0, case.received_weights()), case.server_round)
        del reply  # sent to the server before λ comes back
        return backward(client, SplitFedGradRequest(case.activation_grad(), 0, lr, True), case.server_round)

    return step
