"""MoELayer = router + dispatcher + experts. Knows nothing of training."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .dispatch import Dispatcher
from .experts import ExpertBank, SharedExperts
from .init import deferred_init
from .parallel import ExpertShard, ParallelDims, ProcessGroups
from .routing import RouteKey, RouterConfig, build_router

MOE_LAYER_SCOPE = 0x4D6F45  # "MoE": the init scope tag of a layer's parameters (init_scope)


class MoELayer(nn.Module):
    """A sparse feed-forward layer.

    `y, losses = layer(x)` for x of shape [B, T, d] or [T, d]. The router sees the flattened tokens;
    `shard` says which experts this rank holds (E/ep of them; default all). Construction touches no
    process group: with ep > 1, `moe_train.parallel.parallelize` connects the groups afterwards.
    `last_stats` holds the last call's expert load, dropped fraction and all-to-all bytes.

    Initialisation (moe_train.init): each parameter by its module's rule (router gate, expert
    bank), from a generator keyed by (seed, layer_id, its name in the layer) and, for experts, the
    global expert id. So `MoELayer(seed=s, layer_id=l)` built alone has the weights of layer l of
    a model built with seed s, on any layout. Built on meta, it is left for `materialize`.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        router: RouterConfig | None = None,
        activation: str = "gelu",
        shard: ExpertShard | None = None,
        layer_id: int = 0,
        seed: int = 0,
        init_std: float = 0.02,
        out_std: float | None = None,
        shared_experts: int = 0,
        shared_d_ff: int | None = None,
        shared_gate: bool = False,
    ):
        super().__init__()
        self.router_cfg = router or RouterConfig()
        self.layer_id = layer_id
        self.init_scope = (MOE_LAYER_SCOPE, layer_id)  # keys this layer's init (moe_train.init)
        self.num_experts = num_experts
        self.shard = shard or ExpertShard()  # which experts this rank holds
        self.dispatcher = Dispatcher(num_experts, self.shard)
        with deferred_init(self, seed):
            self.router = build_router(self.router_cfg, d_model, num_experts)
            self.experts = ExpertBank(
                d_model,
                d_ff,
                num_local=self.dispatcher.num_local,
                first_expert=self.dispatcher.first_expert,
                activation=activation,
                init_std=init_std,
                out_std=out_std,
            )
            # always-on dense experts on the local tokens (model.shared_experts); None: none
            self.shared: SharedExperts | None = None
            if shared_experts > 0:
                self.shared = SharedExperts(
                    d_model,
                    shared_d_ff or d_ff,
                    shared_experts,
                    activation,
                    gate=shared_gate,
                    init_std=init_std,
                    out_std=out_std,
                )
        # the last call's load [E], dropped, requested, tokens and dispatcher counters
        self._last: tuple[Tensor, Tensor, int, int] | None = None
        self._last_comm: dict[str, float | Tensor] = {}

    def connect_process_groups(self, dims: ParallelDims, groups: ProcessGroups) -> None:
        """Receive the layout's groups (moe_train.parallel.UsesProcessGroups; see parallelize)."""
        self.dispatcher.connect(dims, groups)

    def forward(
        self, x: Tensor, route_key: RouteKey | None = None, group_size: int | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """x: [B, T, d] or [T, d] -> (y like x, named aux losses).

        Routing groups default to the sequence length T for 3-D input. route_key (the caller's,
        e.g. the train step's) keys the layout-invariant router noise; this layer mixes in its
        layer id (unless the key is `layered`: the model mixed it in for a compiled block).
        Without one, training noise is fresh and eval has none (Router.forward).
        """
        shape = x.shape
        if x.dim() == 3 and group_size is None:
            group_size = shape[1]
        tokens = x.reshape(-1, shape[-1])  # [N, d]
        key = None if route_key is None else route_key.for_layer(self.layer_id)
        a = self.router(tokens, key, group_size=group_size)
        # the shared experts are issued before the dispatch: they need no all-to-all, so an
        # asynchronous dispatcher can run them while the routed tokens are in flight
        shared = self.shared(tokens) if self.shared is not None else None  # [N, d]
        y, comm = self.dispatcher(tokens, a, self.experts)
        if shared is not None:
            y = y + shared
        self._last = (a.expert_load.detach(), a.dropped.detach(), a.requested, a.num_tokens)
        self._last_comm = comm
        return y.reshape(shape), a.losses

    @property
    def last_load(self) -> Tensor | None:
        """[E] slots kept per expert in the last call."""
        return None if self._last is None else self._last[0]

    @property
    @torch.no_grad()
    def last_stats(self) -> dict[str, float]:
        """Load balance, drops and all-to-all bytes of the last call, as floats. Computed when
        read (at log steps), so the forward pass does no host syncs for them."""
        if self._last is None:
            return {}
        expert_load, dropped, requested, num_tokens = self._last
        load = expert_load.float()
        mean = load.mean()
        return {
            "load_cv": float(load.std(unbiased=False) / mean) if mean > 0 else 0.0,
            "load_min": float(load.min()),
            "load_max": float(load.max()),
            "dropped_frac": float(dropped) / max(1, requested),
            "tokens": float(num_tokens),
            **{k: float(v) for k, v in self._last_comm.items()},
            **self.bias_stats(),
        }

    @torch.no_grad()
    def bias_stats(self) -> dict[str, float]:
        """min/max of the router's balancing bias (aux-loss-free balancing); {} without one."""
        bias = self.router.score_bias
        if bias is None:
            return {}
        return {"bias_min": float(bias.min()), "bias_max": float(bias.max())}
