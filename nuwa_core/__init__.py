"""nuwa_core: pure-PyTorch NUWA-Infinity and NUWA-XL (never imports ComfyUI).

NUWA-Infinity: vqgan (tokenizer) -> arbitrary_direction_controller (orders, plans, ADC.Emb)
-> nearby_context_pool (NCP) -> renderer (the vision decoder) -> patch_samplers (AR / NAR /
P-NAR) -> generation (Algorithm 2, canvas state, model bundle).
NUWA-XL: t_klvae -> mask_temporal_diffusion -> diffusion -> diffusion_over_diffusion -> nuwa_xl
(model bundle).
"""
__version__ = "0.1.0"
