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

import torch

from ..entropy_coding import TOTAL
from ..hyper_synthesis import FRACTION_BITS
from ..model_file import ModelFile
from ..model_store import ModelRef, load
from ..network.model import LiteMeanScaleHyperprior
from ..network.release import network_from_release

#: Adam steps fitting the factorized prior to the released tables (a few seconds on a CPU).
PRIOR_FIT_STEPS = 3000


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

