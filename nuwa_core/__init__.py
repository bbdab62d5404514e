"""nuwa_core: pure-PyTorch NUWA-Infinity and NUWA-XL (never imports ComfyUI).

    infinity/     NUWA-Infinity (Wu et al. 2022): vqgan (tokenizer) -> arbitrary_direction_controller
                  (orders, plans, ADC.Emb) -> nearby_context_pool (NCP) -> renderer (the vision
                  decoder) -> patch_samplers (AR / NAR / P-NAR) -> canvas + generation (Algorithm 2,
                  the model bundle)
    xl/           NUWA-XL (Yin et al. 2023): t_klvae -> mask_temporal_diffusion -> diffusion (schedule,
                  samplers) -> diffusion_over_diffusion (the tree) -> model (the bundle)
    training/     `python -m nuwa_core.train`: the shared loop, data, one module per stage
    evaluation/   `python -m nuwa_core.eval`: metrics; the baselines NUWA-Infinity is compared with
    checkpoint, images, attention, memory, weights: shared by both papers
"""
__version__ = "0.2.0"
