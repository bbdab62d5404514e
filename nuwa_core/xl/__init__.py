"""NUWA-XL (Yin et al. 2023): diffusion over diffusion for extremely long video.

    t_klvae                  the temporal KL-VAE (an SD image VAE with temporal layers)
    mask_temporal_diffusion  Mask Temporal Diffusion (MTD), the network of every level
    diffusion                the noise schedule, training loss and samplers (DDIM, DDPM)
    diffusion_over_diffusion the tree: a global diffusion for keyframes, local diffusions between them
    model                    the inference bundle `XLModel` (T-KLVAE + global and local MTD)

Training (the `t_klvae` and `xl` stages) is nuwa_core.training.t_klvae / nuwa_core.training.xl.
"""
