"""The shipped example workflows: where they are, their names, the shipped default model and image they
use, and the stock ComfyUI nodes they may use (tests/test_workflows.py checks the workflows against the
pack's nodes and this allow-list; tests/test_comfyui_server.py runs them on a real server and checks the
allow-list against it; tests/make_thumbnails.py draws their thumbnails)."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# ComfyUI serves a pack's `example_workflows/` in Workflow -> Browse Templates (GET /workflow_templates lists
# them by pack folder, /api/workflow_templates/<pack folder>/<name>.json serves them; a same-name .jpg is the
# thumbnail). It also finds `workflows/` and a few other names, but logs a hint to rename them.
UI_DIR = REPO / "example_workflows"
API_DIR = Path(__file__).resolve().parent / "workflows" / "shipped"
DEFAULT_MODEL = "nuwa_infinity_default.safetensors"  # the panorama model
PAINTING_MODEL = "nuwa_infinity_starry_night.safetensors"
VIDEO_MODEL = "nuwa_infinity_plaza.safetensors"  # image animation; its PG-VQGAN is models/nuwa/pgvqgan/pgvqgan_plaza
TEXT_MODEL = "nuwa_infinity_scenes.safetensors"  # text to image and video; its text encoder is models/nuwa/text_encoders/
SHIPPED_MODELS = (DEFAULT_MODEL, PAINTING_MODEL, VIDEO_MODEL, TEXT_MODEL)
# templates that run on first open in a fresh ComfyUI on a shipped model: (model, image or None). The images ship in
# models/nuwa/; the pack copies them into ComfyUI's input folder when ComfyUI loads it (nodes/_comfy.py
# copy_example_inputs).
# TRAINED: the template trains its model on its image (NUWA Train One-Shot) instead of loading one; the two
# one-shot templates train the same model under the same name, so a second one loads what the first trained.
TRAINED = "trained by the template"
SHIPPED_RUNS = {"outpaint_spiral": (PAINTING_MODEL, "nuwa_infinity_starry_night.jpg"),
                "infinite_panorama": (DEFAULT_MODEL, None),
                "grow_canvas_across_runs": (PAINTING_MODEL, "nuwa_infinity_starry_night.jpg"),
                "outpaint_your_own_painting": (TRAINED, "nuwa_infinity_starry_night.jpg"),
                "seamless_texture": (TRAINED, "nuwa_infinity_starry_night.jpg"),
                "image_animation": (VIDEO_MODEL, "nuwa_infinity_plaza.jpg"),
                "text_to_image_wide": (TEXT_MODEL, None),
                "text_to_video": (TEXT_MODEL, None)}
SHIPPED_IMAGES = tuple(image for _, image in SHIPPED_RUNS.values() if image)
EXPECTED = ("outpaint_spiral", "infinite_panorama", "grow_canvas_across_runs", "text_to_image_wide",
            "nuwa_xl_long_video", "nuwa_xl_ksampler", "outpaint_your_own_painting", "seamless_texture",
            "image_animation", "nuwa_xl_fill_between_frames", "text_to_video")
# NUWA-XL: its own loader and model files; run on the shipped default XL model (models/nuwa_xl) by the real-server
# test, and their thumbnails come from such a run (python tests/make_thumbnails.py --comfyui)
XL_WORKFLOWS = ("nuwa_xl_long_video", "nuwa_xl_ksampler", "nuwa_xl_fill_between_frames")
# NUWA-XL templates that start from frames a user gives (NUWA-XL Encode) and the example frames they load, shipped in
# models/nuwa_xl/ (copied into ComfyUI's input folder like the images above): a held-out pan of the default model's kind
XL_FRAMES = {"nuwa_xl_fill_between_frames": ("nuwa_xl_keyframe_1.png", "nuwa_xl_keyframe_2.png",
                                             "nuwa_xl_keyframe_3.png")}
# every template is one or the other: the runnable ones are queued from the real frontend in a fresh ComfyUI by the
# real-server test; a template that cannot run on the shipped models starts its note with NOT_RUNNABLE_NOTE
RUNNABLE = (*SHIPPED_RUNS, *XL_WORKFLOWS)
NOT_RUNNABLE: tuple[str, ...] = ()
NOT_RUNNABLE_NOTE = "DOES NOT RUN ON THE SHIPPED MODELS"
# the stock KSampler's sampler and scheduler names a shipped workflow may use (the real-server test checks that the
# live server offers them)
KSAMPLER_SAMPLERS = ["euler", "euler_ancestral", "heun", "dpm_2", "lms", "dpmpp_2m", "dpmpp_sde", "ddim", "uni_pc"]
KSAMPLER_SCHEDULERS = ["normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta"]

# Stock ComfyUI nodes the shipped workflows may use: sockets in, widgets (name, spec), sockets out.
# "file" combos list files on the user's machine, so any string passes; "upload" is the
# frontend's image-upload button, stored in widgets_values but not sent to the server.
CORE_NODES = {
    "LoadImage": {"inputs": [], "widgets": [("image", ("file", {})), ("upload", ("upload", {"value": "image"}))],
                  "outputs": [("IMAGE", "IMAGE"), ("MASK", "MASK")]},
    "SaveImage": {"inputs": [("images", "IMAGE")], "widgets": [("filename_prefix", ("STRING", {}))], "outputs": []},
    "PreviewImage": {"inputs": [("images", "IMAGE")], "widgets": [], "outputs": []},
    "CLIPTextEncode": {"inputs": [("clip", "CLIP")], "widgets": [("text", ("STRING", {"multiline": True}))],
                       "outputs": [("CONDITIONING", "CONDITIONING")]},
    "SaveAnimatedWEBP": {"inputs": [("images", "IMAGE")],
                         "widgets": [("filename_prefix", ("STRING", {})),
                                     ("fps", ("FLOAT", {"min": 0.01, "max": 1000.0, "step": 0.01})),
                                     ("lossless", ("BOOLEAN", {})), ("quality", ("INT", {"min": 0, "max": 100})),
                                     ("method", (["default", "fastest", "slowest"], {}))],
                         "outputs": []},
    "KSampler": {"inputs": [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                            ("latent_image", "LATENT")],
                 "widgets": [("seed", ("INT", {"min": 0, "max": 0xffffffffffffffff, "control_after_generate": True})),
                             ("steps", ("INT", {"min": 1, "max": 10000})),
                             ("cfg", ("FLOAT", {"min": 0.0, "max": 100.0, "step": 0.1})),
                             ("sampler_name", (KSAMPLER_SAMPLERS, {})), ("scheduler", (KSAMPLER_SCHEDULERS, {})),
                             ("denoise", ("FLOAT", {"min": 0.0, "max": 1.0, "step": 0.01}))],
                 "outputs": [("LATENT", "LATENT")]},
    "ImageStitch": {"inputs": [("image1", "IMAGE"), ("image2", "IMAGE")],
                    "widgets": [("direction", (["right", "down", "left", "up"], {})), ("match_image_size", ("BOOLEAN", {})),
                                ("spacing_width", ("INT", {"min": 0, "max": 1024, "step": 2})),
                                ("spacing_color", (["white", "black", "red", "green", "blue"], {}))],
                    "outputs": [("IMAGE", "IMAGE")]},
    "ImageBatch": {"inputs": [("image1", "IMAGE"), ("image2", "IMAGE")], "widgets": [], "outputs": [("IMAGE", "IMAGE")]},
    "ConditioningCombine": {"inputs": [("conditioning_1", "CONDITIONING"), ("conditioning_2", "CONDITIONING")],
                            "widgets": [], "outputs": [("CONDITIONING", "CONDITIONING")]},
    "CheckpointLoaderSimple": {"inputs": [], "widgets": [("ckpt_name", ("file", {}))],
                               "outputs": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]},
}
