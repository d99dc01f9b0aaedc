"""Whatever an image file holds, it is stored upright and RGB, and the conversions are counted."""

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from qlnas.cli import main
from qlnas.data.classes import read_conversions
from qlnas.data.writer import write_beton
from tests.data.conftest import psnr, stored_images


def base_photo() -> Image.Image:
    """A 96x64 RGB photo: not square, so a missed rotation changes the shape."""
    from skimage import data

    return Image.fromarray(data.chelsea()).resize((96, 64), Image.Resampling.BILINEAR)


def encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def rotated_jpeg(img: Image.Image) -> bytes:
    """Pixels stored sideways with EXIF orientation 6 (display rotated 90 degrees clockwise),
    as a phone camera writes them."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(img.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif)


def grey16(image: Image.Image) -> Image.Image:
    return Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257)


# file name -> (bytes from the base photo, the kind it counts as, what it must come back as)
KINDS = {
    "0_cmyk.JPEG": (lambda b: encoded(b.convert("CMYK"), "JPEG", quality=95),
                    ("converted_to_rgb", "CMYK", 1), lambda b: b),
    "1_grey.JPEG": (lambda b: encoded(b.convert("L"), "JPEG", quality=95),
                    ("converted_to_rgb", "L", 1), lambda b: b.convert("L").convert("RGB")),
    "2_palette.png": (lambda b: encoded(b.quantize(64), "PNG"),
                      ("converted_to_rgb", "P", 2), lambda b: b.quantize(64).convert("RGB")),
    "3_rgba.png": (lambda b: encoded(b.convert("RGBA"), "PNG"),
                   ("converted_to_rgb", "RGBA", 1), lambda b: b),
    "4_png_bytes.JPEG": (lambda b: encoded(b, "PNG"), ("non_jpeg_reencoded", "PNG", 4),
                         lambda b: b),
    "5_gif_bytes.JPEG": (lambda b: encoded(b, "GIF"), ("non_jpeg_reencoded", "GIF", 1),
                         lambda b: Image.open(io.BytesIO(encoded(b, "GIF"))).convert("RGB")),
    "6_rotated.JPEG": (rotated_jpeg, ("exif_rotated", None, 1), lambda b: b),
    "7_plain.JPEG": (lambda b: encoded(b, "JPEG", quality=95), None, lambda b: b),
    # 16-bit grey (PIL's convert would clip it to white)
    "8_grey16.png": (lambda b: encoded(grey16(b), "PNG"), ("converted_to_rgb", "I;16", 1),
                     lambda b: b.convert("L").convert("RGB")),
}


@pytest.fixture(scope="module")
def odd_beton(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    base = base_photo()
    for name, (make, _, _) in KINDS.items():
        (root / "src" / "a").mkdir(parents=True, exist_ok=True)
        (root / "src" / "a" / name).write_bytes(make(base))
    rotated = ImageOps.exif_transpose(Image.open(root / "src" / "a" / "6_rotated.JPEG"))
    assert rotated.size == base.size  # the test file is what a camera writes
    out = root / "odd.beton"
    write_beton(root / "src", out, workers=1, max_res=128)
    return out, base


@pytest.mark.parametrize("name", list(KINDS))
def test_every_image_comes_back_rgb_and_upright(odd_beton, name):
    out, base = odd_beton
    _, counted, expected = KINDS[name]
    label, image = stored_images(out)[sorted(KINDS).index(name)]
    want = np.asarray(expected(base).convert("RGB"))
    assert image.shape == want.shape == (64, 96, 3)
    assert psnr(image, want) > 28, name
    conversions = read_conversions(out)
    if counted is None:  # the plain RGB JPEG is counted nowhere
        assert conversions == {"converted_to_rgb": {"CMYK": 1, "I;16": 1, "L": 1, "P": 2,
                                                    "RGBA": 1},
                               "exif_rotated": 1, "non_jpeg_reencoded": {"GIF": 1, "PNG": 4}}
    else:
        key, kind, count = counted
        assert (conversions[key] if kind is None else conversions[key][kind]) == count


def test_info_reports_the_conversions(odd_beton, capsys):
    out, _ = odd_beton
    assert main(["data", "info", str(out)]) == 0
    assert ("sources:  converted to RGB: 6 (CMYK 1, I;16 1, L 1, P 2, RGBA 1); EXIF-rotated: 1; "
            "non-JPEG bytes re-encoded: 5 (GIF 1, PNG 4)\n") in capsys.readouterr().out


def test_info_of_a_file_written_before_the_counts(odd_beton, tmp_path, capsys):
    out, _ = odd_beton
    old = tmp_path / "old.beton"
    old.write_bytes(out.read_bytes())
    (tmp_path / "old.beton.classes.json").write_text('{"classes": ["a"]}')
    assert main(["data", "info", str(old)]) == 0
    assert "sources:  conversions not recorded" in capsys.readouterr().out


MEASURE_PEAK = """
import resource, sys
from qlnas.data.folder import load_rgb
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = load_rgb(sys.argv[1], int(sys.argv[2]))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(image.shape[0], image.shape[1], (after - before) // 1024)
"""


def test_a_huge_jpeg_decodes_within_a_bound_set_by_max_res(tmp_path):
    """A 6000x4000 photo (72 MB as RGB) is decoded at a reduced DCT scale: the writer's memory
    grows by a few MB, and the image it gets is at most twice --max-res on its long side."""
    import subprocess
    import sys

    y, x = np.mgrid[0:4000, 0:6000]
    pixels = np.stack([(x // 7) % 256, (y // 5) % 256, ((x + y) // 11) % 256], -1)
    path = tmp_path / "huge.jpg"
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)
    del pixels, x, y
    done = subprocess.run([sys.executable, "-c", MEASURE_PEAK, str(path), "512"],
                          capture_output=True, text=True, check=True)
    h, w, grew_mib = map(int, done.stdout.split())
    assert (h, w) == (500, 750)  # 1/8 scale, the coarsest whose long side still reaches 512
    assert grew_mib < 24, f"decoding grew the process by {grew_mib} MiB"
