"""A released network rebuilt in PyTorch from its model file: the transforms as released.

What the file holds maps back exactly or nearly so:

- g_a, h_a and g_s: the ONNX graphs carry the trained parameters under their state-dict
  names (GDN's reparametrized ``beta`` and ``gamma`` included): copied exactly;
- h_s: integer layers ``round(w * 2**shift)``: divided back (relative error below 2**-12;
  exporting again gives the same integers).

The hyper-latent prior is not rebuilt here (training fits it, ``train.from_release``;
latent refinement costs the hyper-latent with the released tables themselves).
"""

from __future__ import annotations

import onnx
import torch
from onnx import numpy_helper

from ..hyper_synthesis import FRACTION_BITS
from ..model_file import ModelFile
from ..model_store import ModelRef, load
from .model import ARCHITECTURE, LiteMeanScaleHyperprior


def onnx_parameters(graph_bytes: bytes) -> dict[str, torch.Tensor]:
    graph = onnx.load_from_string(graph_bytes).graph
    return {init.name: torch.from_numpy(numpy_helper.to_array(init).copy())
            for init in graph.initializer}


def model_for(model_file: ModelFile) -> LiteMeanScaleHyperprior:
    meta = model_file.meta
    if meta.get("architecture") != ARCHITECTURE:
        raise ValueError(f"model {meta.get('model')!r} has architecture "
                         f"{meta.get('architecture')!r}; training knows {ARCHITECTURE!r}")
    return LiteMeanScaleHyperprior(int(meta["N"]), int(meta["M"]), int(meta["last"]),
                                   int(meta.get("hyper", 0)), int(meta.get("first", 0)),
                                   int(meta.get("analysis", 0)),
                                   int(meta.get("hyper_kernel", 3)))


def hyper_synthesis_state(model_file: ModelFile, model: LiteMeanScaleHyperprior
                           ) -> dict[str, torch.Tensor]:
    convs = [name for name, module in model.h_s.named_children()
             if isinstance(module, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
    layers = model_file.hyper_synthesis.layers
    if len(convs) != len(layers):
        raise ValueError(f"the file's h_s has {len(layers)} layers, the architecture "
                         f"{len(convs)}")
    state = {}
    for name, layer in zip(convs, layers, strict=True):
        state[f"h_s.{name}.weight"] = torch.from_numpy(layer.weight * 2.0**-layer.shift).float()
        state[f"h_s.{name}.bias"] = torch.from_numpy(
            layer.bias * 2.0 ** -(layer.shift + FRACTION_BITS)).float()
    return state


def network_from_release(ref: ModelRef) -> LiteMeanScaleHyperprior:
    """The network in ``ref``'s file with its transforms (g_a, h_a, g_s, h_s) as released;
    the hyper-latent prior is left untrained (``train.from_release.fit_hyper_prior`` fits it)."""
    model_file = load(ref)
    if model_file.int8_synthesis:
        raise ValueError(f"{ref.model}'s synthesis runs in int8, quantized from "
                         f"{model_file.meta.get('parent')}: start from that model instead")
    model = model_for(model_file)
    state = model.state_dict()
    recovered = {**onnx_parameters(model_file.analysis_onnx),
                 **onnx_parameters(model_file.synthesis_onnx),
                 **hyper_synthesis_state(model_file, model)}
    for name, value in recovered.items():
        if name not in state:
            continue  # GDN's constant bounds are part of the graph, not parameters
        if value.shape != state[name].shape:
            raise ValueError(f"{name}: the file has shape {tuple(value.shape)}, the "
                             f"architecture {tuple(state[name].shape)}")
        state[name] = value.float()
    missing = [name for name in state if name not in recovered and name.startswith(
        ("g_a.", "h_a.", "g_s.", "h_s.")) and not name.endswith(("bound", "pedestal"))]
    if missing:
        raise ValueError(f"the model file lacks {', '.join(missing)}")
    model.load_state_dict(state)
    return model
