import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from data.media import REFUSED, MediaError, MediaPaths, load_image, load_images


def _png_with_size(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR claims another size (valid CRC): only the header is believable."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), (10, 20, 30)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def _error(path, **kwargs) -> str:
    with pytest.raises(MediaError) as info:
        load_image(path, **kwargs)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_plain_rgb_png_round_trips(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (7, 11, 3), dtype=np.uint8)
    path = _save(Image.fromarray(pixels), tmp_path / "a.png")
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (11, 7)
    np.testing.assert_array_equal(np.asarray(image), pixels)
    image.load()  # usable after the file was closed


def test_missing_file_and_directory(tmp_path):
    assert "file not found" in _error(tmp_path / "nope.png")
    assert "is a directory" in _error(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert "empty file" in _error(path)


def test_corrupt_file(tmp_path):
    path = tmp_path / "junk.png"
    path.write_bytes(b"this is not an image" * 20)
    assert "not a recognised image format" in _error(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_fails_at_load_time(tmp_path, fmt):
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])
    with Image.open(path) as lazy:
        assert lazy.size == (64, 64)  # the header alone looks fine
    assert "truncated" in _error(path)


def test_too_large_is_refused_from_the_header_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(_png_with_size(9000, 8000))
    message = _error(path)
    assert "too large" in message and "9000x8000" in message and "max_pixels=64000000" in message
    # the limit is inclusive and configurable
    ok = _save(Image.new("RGB", (10, 10)), tmp_path / "ok.png")
    assert load_image(ok, max_pixels=100).size == (10, 10)
    assert "too large" in _error(ok, max_pixels=99)


@pytest.mark.parametrize("size", [(10_000, 10_000), (100_000, 100_000)])
def test_pil_decompression_bomb_guard_becomes_media_error(tmp_path, size):
    # 1e8 pixels trips PIL's warning, 1e10 its error; both must surface as MediaError even when our own
    # limit is raised above them.
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_with_size(*size))
    assert "decompression bomb" in _error(path, max_pixels=10**12)


def test_zero_size_image(tmp_path):
    path = tmp_path / "zero.png"
    path.write_bytes(_png_with_size(0, 5))
    message = _error(path)  # PIL itself refuses a zero-width PNG header; other formats reach our own check
    assert "zero-size image" in message or "not a recognised image format" in message


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)
    pixels[:, :10] = (255, 0, 0)  # left half red
    pixels[:, 10:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = _save(Image.fromarray(pixels), tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    image = np.asarray(load_image(path)).astype(int)
    assert image.shape == (20, 10, 3)  # width and height swapped
    assert np.abs(image[3, 5] - (255, 0, 0)).max() < 40  # left half is now on top
    assert np.abs(image[16, 5] - (0, 0, 255)).max() < 40


def test_rgba_is_composited_over_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top opaque red-ish, bottom fully transparent
    rgba[2:, :2, 3] = 0
    rgba[2:, 2:, 3] = 128  # half transparent
    image = np.asarray(load_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))).astype(int)
    assert tuple(image[0, 0]) == (200, 0, 0)
    assert tuple(image[3, 0]) == (255, 255, 255)
    assert np.abs(image[3, 3] - (227, 127, 127)).max() <= 1


def test_palette_images_with_and_without_transparency(tmp_path):
    palette_image = Image.new("P", (4, 4), 1)
    palette_image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette_image.putpixel((0, 0), 0)
    plain = load_image(_save(palette_image, tmp_path / "p.png"))
    assert plain.mode == "RGB"
    assert plain.getpixel((1, 1)) == (10, 200, 30) and plain.getpixel((0, 0)) == (0, 0, 0)
    transparent = load_image(_save(palette_image, tmp_path / "pt.png", transparency=0))
    assert transparent.getpixel((0, 0)) == (255, 255, 255)  # transparent index shows as white
    assert transparent.getpixel((1, 1)) == (10, 200, 30)
    gif = load_image(_save(palette_image, tmp_path / "p.gif", transparency=0))
    assert gif.getpixel((0, 0)) == (255, 255, 255) and gif.getpixel((1, 1)) == (10, 200, 30)


def test_greyscale_cmyk_and_16_bit(tmp_path):
    grey = load_image(_save(Image.new("L", (3, 2), 77), tmp_path / "l.png"))
    assert grey.mode == "RGB" and grey.getpixel((2, 1)) == (77, 77, 77)
    cmyk = load_image(_save(Image.new("CMYK", (3, 2), (0, 255, 255, 0)), tmp_path / "c.tif"))
    assert cmyk.getpixel((0, 0)) == (255, 0, 0)
    sixteen = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(sixteen), tmp_path / "i16.png")
    with Image.open(path) as raw:
        assert raw.mode in ("I;16", "I")
    values = np.asarray(load_image(path))[0, :, 0]
    assert values.tolist() == [0, 100, 255]  # scaled, not clipped to 255


def test_load_images_keeps_order_and_reports_the_bad_one(tmp_path):
    a = _save(Image.new("RGB", (2, 2), (1, 2, 3)), tmp_path / "a.png")
    b = _save(Image.new("RGB", (3, 3), (4, 5, 6)), tmp_path / "b.bmp")
    images = load_images([a, b])
    assert [im.getpixel((0, 0)) for im in images] == [(1, 2, 3), (4, 5, 6)]
    with pytest.raises(MediaError, match="missing.png: file not found"):
        load_images([a, tmp_path / "missing.png", b])


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_image_is_refused_not_cut_to_its_first_frame(tmp_path, fmt):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=100)
    assert _error(path) == f"{path}: animated or multi-frame image (3 frames); an image input takes one frame"
    frames[0].save(tmp_path / "still.gif")  # a one-frame GIF is an image like any other
    assert load_image(tmp_path / "still.gif").getpixel((0, 0)) == (255, 0, 0)


def test_media_paths_are_confined_to_the_dataset_folder_and_roots(tmp_path):
    data, extra, outside = tmp_path / "data", tmp_path / "extra", tmp_path / "outside"
    for folder in (data / "images", extra, outside):
        folder.mkdir(parents=True)
    (outside / "secret.png").write_bytes(b"x")
    (data / "linked").symlink_to(outside, target_is_directory=True)  # placed there by the user: trusted
    media = MediaPaths(data, roots=[extra])
    assert media.resolve("images/a.png") == data / "images" / "a.png"
    assert media.resolve("images/../images/a.png") == data / "images" / "a.png"
    assert media.resolve(str(extra / "b.png")) == extra / "b.png"
    assert media.resolve("linked/secret.png") == data / "linked" / "secret.png"
    refused = ["../outside/secret.png", "../outside/none.png", str(outside / "secret.png"), "/etc/passwd"]
    messages = set()
    for entry in refused:  # whether the file exists or not: one message, and the file is never touched
        with pytest.raises(MediaError) as info:
            media.resolve(entry)
        assert info.value.path == entry and info.value.reason == REFUSED
        messages.add(info.value.reason)
    assert messages == {"refused: outside the dataset folder and the media roots"}
