"""NUWA-Infinity (Wu et al. 2022): autoregressive over autoregressive generation of images and videos
of any size, in any direction. One module per part of the paper:

    vqgan                           the VQGAN tokenizer (taming-transformers layout)
    arbitrary_direction_controller  ADC.Split / T / T^-1, orders, outpainting plans, ADC.Emb
    nearby_context_pool             NCP.Select / Add / Remove
    renderer                        the vision decoder NUWA(p, c, e, y), Eq. 9-13
    patch_samplers                  AR / NAR / P-NAR local decoders (plain functions, one signature)
    canvas                          the canvas a generation reads and returns (tokens, pool, pixels)
    generation                      Algorithm 2 and the model bundle `NuwaInfinity`

Algorithm 1 (render-and-optimize training) is nuwa_core.training.renderer.
"""
