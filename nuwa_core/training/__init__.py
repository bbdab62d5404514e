"""Training, `python -m nuwa_core.train STAGE` (cli.py).

    loop             what every stage shares: errors, DDP, training checkpoints, stop requests, the step loop
    data             images (one-shot augmentation, appendix D) and videos
    vqgan, renderer, bundle, sample     NUWA-Infinity stages (renderer: Algorithm 1, render-and-optimize)
    t_klvae, xl                         NUWA-XL stages
    captions, perceptual_loss           caption features for the renderer; LPIPS for the VQGAN and T-KLVAE
    vae_loss                            Latent Diffusion's KL-VAE objective (the t_klvae stage)
"""
