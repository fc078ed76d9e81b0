"""The trained network in PyTorch, shared by training and latent refinement.

- :mod:`.model`: the architecture (CompressAI's mean-scale hyperprior, lighter synthesis);
- :mod:`.release`: a released model file rebuilt as that network;
- :mod:`.loss`: the rate-distortion loss's distortion term and its constants.

Needs the ``train`` extra (PyTorch, CompressAI); decoding never imports it.
"""
