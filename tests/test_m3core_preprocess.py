"""Preprocessing by LLaVA-1.5's rule: a non-square image is padded to a square, never cropped."""

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from m3core import MICRO, NestedLMM, tiny_lmm
from m3core.shipped import SHIPPED
from tests.conftest import MICRO_WORDS

RED, BLUE, GREY = (230, 20, 20), (20, 20, 230), (128, 128, 128)


def striped(width: int = 300, height: int = 200) -> Image.Image:
    """Grey, with a red band on the left tenth and a blue band on the right tenth."""
    image = Image.new("RGB", (width, height), GREY)
    image.paste(RED, (0, 0, width // 10, height))
    image.paste(BLUE, (width - width // 10, 0, width, height))
    return image


def as_rgb(lmm: NestedLMM, image: Image.Image) -> torch.Tensor:
    """(3, S, S) pixel values back in 0..255."""
    processor = lmm.image_processor
    mean = torch.tensor(processor.image_mean)[:, None, None]
    std = torch.tensor(processor.image_std)[:, None, None]
    return (lmm.pixel_values([image])[0].float() * std + mean) * 255


@pytest.fixture(params=["micro", "tiny-m3", "tiny-mqt"])
def lmm(request):
    if request.param == "micro":
        return tiny_lmm(MICRO_WORDS, MICRO)
    return NestedLMM.from_pretrained(SHIPPED / request.param, device="cpu")


def test_a_300x200_image_keeps_its_borders_and_is_padded_with_the_mean_colour(lmm):
    rgb = as_rgb(lmm, striped())
    side = rgb.shape[-1]
    middle = side // 2
    left, right = rgb[:, middle, 0], rgb[:, middle, -1]
    assert left[0] > 180 and left[2] < 80, left  # the red band is still there
    assert right[2] > 180 and right[0] < 80, right  # and the blue one
    fill = torch.tensor([int(x * 255) for x in lmm.image_processor.image_mean], dtype=torch.float)
    for row in (0, side - 1):  # top and bottom: the padding, in the processor's mean colour
        torch.testing.assert_close(rgb[:, row, middle], fill, atol=2.0, rtol=0)


def test_a_square_image_is_processed_exactly_as_before(lmm):
    square = striped(96, 96)
    side = lmm.image_processor.crop_size["height"]
    before = CLIPImageProcessorPil(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )(images=[square], return_tensors="pt")["pixel_values"]
    assert torch.equal(lmm.pixel_values([square]).cpu(), before)
