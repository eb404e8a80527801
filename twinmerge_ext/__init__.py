"""twinmerge_ext: Twin-Merging (Lu et al., NeurIPS 2024) as PyTorch C++/CUDA operators."""

from twinmerge_ext import merging
from twinmerge_ext.checkpoint import LowRankDelta, TwinCheckpoint
from twinmerge_ext.energy import EnergyRouter, energy_layers, fit_energy_router, subspace_energies
from twinmerge_ext.lora import LoraExpert
from twinmerge_ext.prototype_router import PrototypeRouter
from twinmerge_ext.router import Router, TwinRouter, fit_router, pooled_features, router_from_config
from twinmerge_ext.text_router import ProductRouter, TextRouter, fit_product_alpha, fit_text_router
from twinmerge_ext.module import TwinMergedModule
from twinmerge_ext.serving import ServeLoop
from twinmerge_ext.ops import (
    dense_merge_,
    lowrank_merge_,
    lowrank_mix_linear,
    reconstruct_delta,
    truncated_svd,
)

__version__ = "0.1.0"

__all__ = [
    "EnergyRouter",
    "LoraExpert",
    "LowRankDelta",
    "ProductRouter",
    "PrototypeRouter",
    "Router",
    "ServeLoop",
    "TwinCheckpoint",
    "TwinMergedModule",
    "TextRouter",
    "TwinRouter",
    "energy_layers",
    "fit_energy_router",
    "fit_product_alpha",
    "fit_router",
    "fit_text_router",
    "router_from_config",
    "subspace_energies",
    "pooled_features",
    "merging",
    "dense_merge_",
    "lowrank_merge_",
    "lowrank_mix_linear",
    "reconstruct_delta",
    "truncated_svd",
]
