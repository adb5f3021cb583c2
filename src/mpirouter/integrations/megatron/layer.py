"""`MPIMoELayer` and `mpi_layer_spec`: Megatron-Core's MoE layer with an `MPITopKRouter`, plugged in through the spec.

    spec = mpi_layer_spec(get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False), MPIConfig(kind="mpi"))
    model = GPTModel(config, transformer_layer_spec=spec, ...)          # in pretrain_gpt.py's model provider

Megatron builds the router before the experts (moe_layer.py, `MoELayer.__init__`), so the layer hands the
experts to the router once both exist. Nothing of Megatron is patched: the spec's MoE entry becomes this
layer with the router swapped in `MoESubmodules.router`.
"""

from __future__ import annotations

import dataclasses
import functools

from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec

from .router import MPITopKRouter
from .rows import MPIConfig


class MPIMoELayer(MoELayer):
    """`MoELayer` whose router (an `MPITopKRouter`) reads this layer's experts."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.router, MPITopKRouter):
            raise ValueError(f"MPIMoELayer needs an MPITopKRouter, got {type(self.router).__qualname__}: "
                             "build the layer spec with mpi_layer_spec")
        self.router.attach_experts(self.experts, self.ep_group)  # BaseMoELayer's pg_collection.ep


def _mpi_router(subs: MoESubmodules, mpi: MPIConfig) -> functools.partial:
    if subs.router is not TopKRouter:  # e.g. the inference spec's InferenceTopKRouter, or a router of the user's own
        raise ValueError(f"mpi_layer_spec: the spec's MoE router is {getattr(subs.router, '__qualname__', subs.router)!r}; "
                         "it replaces Megatron's TopKRouter only")
    return functools.partial(MPITopKRouter, mpi=mpi)


def _mpi_moe(builder, mpi: MPIConfig):
    """The MoE builder of a layer spec with the MPI layer and router; None when `builder` is not an MoE one."""
    if isinstance(builder, functools.partial) and isinstance(builder.func, type) and issubclass(builder.func, MoELayer):
        subs = builder.keywords.get("submodules")
        if not isinstance(subs, MoESubmodules):
            return None
        router = _mpi_router(subs, mpi)
        keywords = {**builder.keywords, "submodules": dataclasses.replace(subs, router=router)}
        return functools.partial(MPIMoELayer, *builder.args, **keywords)
    if isinstance(builder, ModuleSpec) and isinstance(builder.module, type) and issubclass(builder.module, MoELayer):
        subs = builder.submodules
        if not isinstance(subs, MoESubmodules):
            return None
        router = _mpi_router(subs, mpi)
        return dataclasses.replace(builder, module=MPIMoELayer, submodules=dataclasses.replace(subs, router=router))
    return None


def mpi_layer_spec(spec, mpi: MPIConfig = MPIConfig()):
    """A copy of a GPT layer spec (`get_gpt_layer_local_spec` / `..._with_transformer_engine_spec`, or a
    `TransformerBlockSubmodules` of several layer specs) whose MoE layers use MPI routers; dense layers unchanged.
    Convert the decoder's spec before deriving a multi-token-prediction block spec from it. ValueError when no layer
    of it is an MoE layer (HybridModel stack specs are not supported yet)."""
    found = []

    def convert(layer_spec):
        subs = getattr(layer_spec, "submodules", None)
        mlp = getattr(subs, "mlp", None)
        new = _mpi_moe(mlp, mpi)
        if new is None:
            return layer_spec
        found.append(layer_spec)
        return dataclasses.replace(layer_spec, submodules=dataclasses.replace(subs, mlp=new))

    layers = getattr(spec, "layer_specs", None)
    out = dataclasses.replace(spec, layer_specs=[convert(s) for s in layers]) if layers is not None else convert(spec)
    if not found:
        raise ValueError("mpi_layer_spec: no MoE layer in this spec: pass a GPT layer spec built with num_experts, or a "
                         "TransformerBlockSubmodules of them (HybridModel stack specs are not supported yet)")
    return out
