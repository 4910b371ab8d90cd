"""MU-SplitFed's settings (as the HO-SFL authors reimplemented it): zeroth-order steps on both sides,
``τ`` server steps per client step, FedAvg-style mixing of client segments and server replicas."""

from __future__ import annotations

from dataclasses import dataclass

from ...options import Settings, setting


@dataclass(frozen=True)
class MUSplitFedSettings(Settings):
    """The round of MU-SplitFed (docs/protocols.md, "MU-SplitFed")."""

    local_steps: int = setting(
        "mu-splitfed.local-steps", 1, "E: client steps per round (each: z, z± up, P scalars down)", minimum=1
    )
    server_steps: int = setting(
        "mu-splitfed.server-steps", 2, "τ: zeroth-order steps of a client's server replica per client step", minimum=1
    )
    num_perturbations: int = setting(
        "mu-splitfed.num-perturbations",
        5,
        "P: directions averaged in every zeroth-order estimate, the clients' and the server's",
        minimum=1,
    )
    mu: float = setting(
        "mu-splitfed.mu", 1e-3, "μ: perturbation scale of both sides' central differences", minimum=1e-7, maximum=1.0
    )
    client_lr: float = setting("mu-splitfed.client-lr", 0.02, "SGD learning rate of the clients' zeroth-order steps", minimum=0.0)
    server_lr: float = setting(
        "mu-splitfed.server-lr", 0.02, "SGD learning rate of the server replicas' zeroth-order steps", minimum=0.0
    )
    global_lr: float = setting(
        "mu-splitfed.global-lr",
        1.0,
        "η_g: the global segments move by η_g × (average of the trained ones − global); 1 is plain FedAvg",
        minimum=0.0,
        maximum=1.0,
        exclusive_minimum=True,
    )
