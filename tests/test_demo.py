"""The main job (python -m nuwa_core.demo) on a tiny random model: every picture is written."""
import torch

from _tiny import tiny_model
from nuwa_core import demo
from nuwa_core.images import load_image
from nuwa_core.infinity.patch_samplers import SamplerSettings


def test_demo_outpaints_a_crop_at_the_right_end_and_grows_a_panorama(tmp_path):
    torch.manual_seed(0)
    model = tiny_model()
    ph, pw = model.patch_pixels
    image = torch.rand(1, 2 * ph, 5 * pw, 3)
    seconds = demo.run_demo(model, image, (2, 2), True, tmp_path, SamplerSettings(top_k=8), seed=0, width_factor=2)
    assert set(seconds) == set(demo.EXTENSIONS) | {"panorama"}
    crop = load_image(tmp_path / "input_crop.png")
    assert torch.allclose(crop, image[:, :, 3 * pw:], atol=1 / 255)  # the right end: where shipped models did not train
    assert load_image(tmp_path / "outpaint_all_directions.png").shape == (1, 4 * ph, 4 * pw, 3)
    assert load_image(tmp_path / "panorama.png").shape == (1, 2 * ph, 10 * pw, 3)
