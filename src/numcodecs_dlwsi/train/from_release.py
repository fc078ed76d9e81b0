"""A training checkpoint rebuilt from a released model file, so any release can be trained on.

Checkpoints are not released (only model files are), and a fresh checkout has none, so a
run that continues a released network starts here. What the file holds maps back exactly
or nearly so:

- g_a, h_a and g_s: the ONNX graphs carry the trained parameters under their state-dict
  names (GDN's reparametrized ``beta`` and ``gamma`` included): copied exactly;
- h_s: integer layers ``round(w * 2**shift)``: divided back (relative error below 2**-12;
  exporting again gives the same integers);
- the hyper-latent prior: only its integer frequency tables and medians were released, so
  CompressAI's factorized density is fitted to those tables (cross-entropy), with the
  quantiles set so that exporting again gives the same table ranges.

The Gaussian conditional has no learned parameters. Optimizer state is not recoverable;
the checkpoint is an ``--init`` for a new run.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from onnx import numpy_helper

from ..entropy_coding import TOTAL
from ..hyper_synthesis import FRACTION_BITS
from ..model_file import ModelFile
from ..model_store import ModelRef, load
from .model import ARCHITECTURE, LiteMeanScaleHyperprior

#: Adam steps fitting the factorized prior to the released tables (a few seconds on a CPU).
PRIOR_FIT_STEPS = 3000


def _onnx_parameters(graph_bytes: bytes) -> dict[str, torch.Tensor]:
    graph = onnx.load_from_string(graph_bytes).graph
    return {init.name: torch.from_numpy(numpy_helper.to_array(init).copy())
            for init in graph.initializer}


def _model_for(model_file: ModelFile) -> LiteMeanScaleHyperprior:
    meta = model_file.meta
    if meta.get("architecture") != ARCHITECTURE:
        raise ValueError(f"model {meta.get('model')!r} has architecture "
                         f"{meta.get('architecture')!r}; training knows {ARCHITECTURE!r}")
    return LiteMeanScaleHyperprior(int(meta["N"]), int(meta["M"]), int(meta["last"]),
                                   int(meta.get("hyper", 0)), int(meta.get("first", 0)),
                                   int(meta.get("analysis", 0)),
                                   int(meta.get("hyper_kernel", 3)))


def _hyper_synthesis_state(model_file: ModelFile, model: LiteMeanScaleHyperprior
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


def fit_hyper_prior(model: LiteMeanScaleHyperprior, model_file: ModelFile,
                    steps: int = PRIOR_FIT_STEPS) -> float:
    """Fit the factorized prior to the file's hyper-latent tables; returns the mean excess
    cost in bits per symbol (cross-entropy minus the tables' own entropy)."""
    eb = model.entropy_bottleneck
    medians = model_file.z_medians_fixed / float(1 << FRACTION_BITS)
    tables = model_file.z_tables
    with torch.no_grad():
        for c, table in enumerate(tables):
            low, high = -table.lo, table.escape - 1 + table.lo  # the values the table holds
            eb.quantiles[c, 0] = torch.tensor([medians[c] - low, medians[c],
                                               medians[c] + high])
    width = max(t.escape for t in tables)
    offsets = torch.zeros(len(tables), width)
    target = torch.zeros(len(tables), width)
    for c, table in enumerate(tables):
        n = table.escape
        offsets[c, :n] = torch.arange(table.lo, table.lo + n, dtype=torch.float32)
        target[c, :n] = torch.from_numpy(table.freqs[:n] / TOTAL).float()
    samples = (offsets + torch.from_numpy(medians).float()[:, None])[:, None, :]
    parameters = [p for n, p in eb.named_parameters() if not n.endswith("quantiles")]
    optimizer = torch.optim.Adam(parameters, lr=1e-2)
    entropy = float(-(target * torch.log2(target.clamp_min(1e-30))).sum() / len(tables))
    for step in range(steps):
        if step == steps * 2 // 3:
            for group in optimizer.param_groups:
                group["lr"] = 1e-3
        likelihood, _, _ = eb._likelihood(samples)
        loss = -(target * torch.log2(likelihood[:, 0].clamp_min(1e-12))).sum() / len(tables)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss.detach()) - entropy


def network_from_release(ref: ModelRef) -> LiteMeanScaleHyperprior:
    """The network in ``ref``'s file with its transforms (g_a, h_a, g_s, h_s) as released;
    the hyper-latent prior is left untrained (:func:`fit_hyper_prior` fits it)."""
    model_file = load(ref)
    model = _model_for(model_file)
    state = model.state_dict()
    recovered = {**_onnx_parameters(model_file.analysis_onnx),
                 **_onnx_parameters(model_file.synthesis_onnx),
                 **_hyper_synthesis_state(model_file, model)}
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


def checkpoint_from_release(ref: ModelRef, prior_steps: int = PRIOR_FIT_STEPS
                            ) -> tuple[dict, float]:
    """A checkpoint (as ``dlwsi-train train`` saves them, without optimizer state) of the
    network in ``ref``'s file, and the hyper-prior fit's excess cost in bits per symbol."""
    model_file = load(ref)
    model = network_from_release(ref)
    excess_bits = fit_hyper_prior(model, model_file, prior_steps)
    meta = model_file.meta
    config = {"lmbda": meta.get("lambda"), "ssim_weight": meta.get("ssim_weight", 0.0),
              "released_from": {"model": ref.model, "sha256": ref.sha256,
                                "file_steps": meta.get("steps")}}
    return {"model": model.state_dict(), "optimizer": None, "aux_optimizer": None,
            "step": 0, "config": config, "model_config": model.config()}, excess_bits


def write_checkpoint_from_release(ref: ModelRef, out: Path) -> float:
    """Write :func:`checkpoint_from_release` to ``out``; returns the fit's excess bits."""
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another path")
    state, excess_bits = checkpoint_from_release(ref)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(out)
    return excess_bits

