"""Training data layer (no ComfyUI): image folder + captions, decoding, buckets, graph input,
prompt lists and the seeded bucket sampler. Images are real files written with Pillow."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from rewardtune.trainers.data import (
    IMAGE_EXTENSIONS, BatchSampler, DatasetError, Example, bucket_sizes, examples_from_graph, fit_to_bucket,
    load_examples, parse_prompts, read_image_folder)

TOL = 1 / 255 + 1e-6
RED, BLUE = (255, 0, 0), (0, 0, 255)


def solid(path, color=(200, 100, 50), size=(16, 16), mode="RGB", caption="a photo"):
    """Write a one-colour image (size is Pillow's (w, h)) and, unless caption is None, its .txt."""
    Image.new(mode, size, color).save(path)
    if caption is not None:
        with open(os.path.splitext(path)[0] + ".txt", "w", encoding="utf-8") as f:
            f.write(caption)
    return str(path)


def only_example(buckets):
    (examples,) = buckets.values()
    assert len(examples) == 1
    return examples[0]


def color(rgb):
    return torch.tensor(rgb, dtype=torch.float32) / 255


# ------------------------------------------------------------------------------ folder reading
def test_captions_read_matched_and_sorted(tmp_path):
    solid(tmp_path / "b.png", caption="second")
    solid(tmp_path / "a.jpg", caption="  a red\n  cat \n\n")  # newlines joined, whitespace stripped
    solid(tmp_path / "c.webp", caption="\ufeffthird")            # a Notepad BOM is not caption text
    solid(tmp_path / "D.BMP", caption="fourth")                  # extensions are case-insensitive
    (tmp_path / "notes.md").write_text("ignored")
    pairs = read_image_folder(str(tmp_path))
    assert [(os.path.basename(p), c) for p, c in pairs] == [
        ("D.BMP", "fourth"), ("a.jpg", "a red cat"), ("b.png", "second"), ("c.webp", "third")]
    assert all(os.path.isabs(p) or p.startswith(str(tmp_path)) for p, _ in pairs)


def test_missing_folder_and_not_a_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        read_image_folder(str(tmp_path / "nope"))
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    with pytest.raises(DatasetError, match="is not a folder"):
        read_image_folder(str(f))


def test_empty_folder_error_lists_extensions(tmp_path):
    with pytest.raises(DatasetError, match="no images") as e:
        read_image_folder(str(tmp_path))
    assert all(ext in str(e.value) for ext in IMAGE_EXTENSIONS)
    assert ".txt file" not in str(e.value)


def test_txt_only_folder_error(tmp_path):
    (tmp_path / "a.txt").write_text("a cat")
    (tmp_path / "b.txt").write_text("a dog")
    with pytest.raises(DatasetError, match=r"2 \.txt file\(s\) but no images"):
        read_image_folder(str(tmp_path))


def test_image_without_caption_named(tmp_path):
    solid(tmp_path / "ok.png")
    solid(tmp_path / "lonely.png", caption=None)
    with pytest.raises(DatasetError) as e:
        read_image_folder(str(tmp_path))
    msg = str(e.value)
    assert "lonely.png" in msg and str(tmp_path / "lonely.txt") in msg and "ok.png" not in msg


def test_many_missing_captions_listed_up_to_five(tmp_path):
    for i in range(7):
        solid(tmp_path / f"img{i}.png", caption=None)
    with pytest.raises(DatasetError, match="7 image") as e:
        read_image_folder(str(tmp_path))
    assert "img4.png" in str(e.value) and "img5.png" not in str(e.value) and "and 2 more" in str(e.value)


@pytest.mark.parametrize("text", ["", "  \n\n \t"])
def test_empty_caption_error(tmp_path, text):
    solid(tmp_path / "x.png", caption=text)
    with pytest.raises(DatasetError, match="empty") as e:
        read_image_folder(str(tmp_path))
    assert "x.txt" in str(e.value)


# ------------------------------------------------------------------------------ decoding
def test_corrupt_image_named(tmp_path):
    (tmp_path / "x.png").write_bytes(b"this is not a png at all" * 10)
    (tmp_path / "x.txt").write_text("a cat")
    with pytest.raises(DatasetError, match="re-save") as e:
        load_examples(str(tmp_path), 32, 32, bucket_step=8)
    assert "x.png" in str(e.value)


def test_truncated_image_named(tmp_path):
    good = solid(tmp_path / "good.png", caption=None)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    noise.save(tmp_path / "y.png")
    data = (tmp_path / "y.png").read_bytes()
    (tmp_path / "y.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="y.png"):
        load_examples([(good, "fine"), (str(tmp_path / "y.png"), "cut")], 32, 32, bucket_step=8)


def test_rgb_solid_colour(tmp_path):
    solid(tmp_path / "a.png")
    ex = only_example(load_examples(str(tmp_path), 16, 16, bucket_step=8))
    assert ex.image.shape == (16, 16, 3) and ex.image.dtype == torch.float32
    assert torch.allclose(ex.image, color((200, 100, 50)).expand(16, 16, 3), atol=TOL)
    assert ex.caption == "a photo" and ex.source == str(tmp_path / "a.png")


def test_rgba_drops_alpha_onto_white(tmp_path):
    im = Image.new("RGBA", (16, 16), (10, 200, 30, 255))
    im.paste((0, 0, 0, 0), (8, 0, 16, 16))  # right half fully transparent
    im.save(tmp_path / "a.png")
    ex = only_example(load_examples([(str(tmp_path / "a.png"), "c")], 16, 16, bucketing=False))
    assert ex.image.shape == (16, 16, 3)
    assert torch.allclose(ex.image[:, :8], color((10, 200, 30)).expand(16, 8, 3), atol=TOL)
    assert torch.allclose(ex.image[:, 8:], torch.ones(16, 8, 3), atol=TOL)


@pytest.mark.parametrize("mode,value,rgb", [("L", 100, (100, 100, 100)), ("LA", (100, 255), (100, 100, 100)),
                                            ("P", 0, (0, 0, 0))])
def test_grey_and_palette_become_rgb(tmp_path, mode, value, rgb):
    path = solid(tmp_path / "g.png", value, mode=mode, caption=None)
    ex = only_example(load_examples([(path, "c")], 16, 16, bucket_step=8))
    assert ex.image.shape == (16, 16, 3)
    assert torch.allclose(ex.image, color(rgb).expand(16, 16, 3), atol=TOL)


def test_palette_with_colours(tmp_path):
    Image.new("RGB", (16, 16), (30, 60, 90)).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    ex = only_example(load_examples([(str(tmp_path / "p.png"), "c")], 16, 16, bucket_step=8))
    assert torch.allclose(ex.image, color((30, 60, 90)).expand(16, 16, 3), atol=TOL)


def test_16bit_png_full_range(tmp_path):
    Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    ex = only_example(load_examples([(str(tmp_path / "d.png"), "c")], 16, 16, bucket_step=8))
    assert ex.image.shape == (16, 16, 3)
    assert torch.allclose(ex.image, torch.full((16, 16, 3), 40000 / 65535), atol=TOL)


def test_exif_rotated_jpeg(tmp_path):
    im = Image.new("RGB", (32, 16), RED)          # stored 32 wide x 16 tall: left red, right blue
    im.paste(BLUE, (16, 0, 32, 16))
    exif = im.getexif()
    exif[0x0112] = 6                              # "rotate 90° clockwise to display"
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    ex = only_example(load_examples([(str(tmp_path / "r.jpg"), "c")], 16, 32, bucketing=False))
    assert ex.image.shape == (32, 16, 3)          # displayed 16 wide x 32 tall: no resize needed
    top, bottom = ex.image[2:12].mean((0, 1)), ex.image[20:30].mean((0, 1))
    assert torch.allclose(top, color(RED), atol=0.05) and torch.allclose(bottom, color(BLUE), atol=0.05)
    # bucketing sees the displayed (tall) shape
    (size,) = load_examples([(str(tmp_path / "r.jpg"), "c")], 32, 32, bucket_step=8).keys()
    assert size[0] > size[1]


# ------------------------------------------------------------------------------ fit / buckets
@pytest.mark.parametrize("src,size", [((70, 50), (32, 48)), ((10, 30), (24, 24)), ((40, 40), (56, 40))])
def test_fit_to_bucket_size_and_solid_colour(src, size):
    img = color((30, 160, 240)).expand(*src, 3).clone()
    out = fit_to_bucket(img, size)
    assert out.shape == (*size, 3)
    assert torch.allclose(out, color((30, 160, 240)).expand(*size, 3), atol=1e-5)


def test_fit_to_bucket_centre_crop_and_content():
    wide = torch.zeros(20, 60, 3)
    wide[:, 20:40] = 1.0                          # only the middle third is white
    assert torch.equal(fit_to_bucket(wide, (20, 20)), torch.ones(20, 20, 3))
    square = torch.zeros(64, 64, 3)
    square[24:40, 24:40] = 1.0                    # a white square in the middle, downscaled 2x
    out = fit_to_bucket(square, (32, 32))
    assert out.shape == (32, 32, 3) and out.min() >= 0 and out.max() <= 1
    assert out[14:18, 14:18].min() > 0.95 and out[:8, :8].max() < 0.05
    tall = torch.zeros(90, 30, 3)
    tall[30:60] = 1.0
    out = fit_to_bucket(tall, (15, 15))           # 2x downscale of the middle 30x30 (the white band)
    assert out.shape == (15, 15, 3) and out[3:12].min() > 0.95


def test_fit_to_bucket_work_is_bounded_by_the_bucket():
    """A strip far longer than its bucket is cut to the part the crop keeps (8× it) before the
    resize: 1 × 1,000,000 into 64 × 128 used to be scaled to 64 × 64,000,000 (49 GB) to keep 64 × 128.
    Where the whole resize can run, the result is the same (a smooth image within 5e-3); an image
    within 8× its bucket is resized as before (the tests above)."""
    import time
    import torch.nn.functional as F

    def whole(image, size):  # cover-resize the whole image, then crop (what fit_to_bucket did)
        th, tw = size
        h, w = image.shape[:2]
        scale = max(th / h, tw / w)
        nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
        x = F.interpolate(image.movedim(-1, 0)[None], size=(nh, nw), mode="bicubic", antialias=True,
                          align_corners=False).clamp(0, 1)
        top, left = (nh - th) // 2, (nw - tw) // 2
        return x[0, :, top:top + th, left:left + tw].movedim(0, -1)
    gen = torch.Generator().manual_seed(0)
    for (h, w), size in (((4, 2000), (64, 128)), ((3000, 40), (128, 64)), ((700, 9000), (64, 64))):
        smooth = F.interpolate(torch.rand(1, 3, 5, 5, generator=gen), size=(h, w), mode="bilinear")[0].movedim(0, -1)
        out = fit_to_bucket(smooth, size)
        assert out.shape == (*size, 3) and (out - whole(smooth, size)).abs().max() < 5e-3, (h, w)
    t0 = time.perf_counter()
    for shape, size in (((1, 1_000_000, 3), (64, 128)), ((1_000_000, 1, 3), (128, 64))):
        assert fit_to_bucket(torch.rand(shape), size).shape == (*size, 3)
    assert time.perf_counter() - t0 < 5.0


def test_bucket_sizes_examples():
    assert bucket_sizes(64, 64) == [(64, 64)]
    b512 = bucket_sizes(512, 512)
    assert (512, 512) in b512 and (384, 704) in b512 and (704, 384) in b512
    assert all(h % 8 == 0 and w % 8 == 0 for h, w in bucket_sizes(32, 32, step=8))
    assert len(bucket_sizes(32, 32, step=8)) > 1
    assert (300, 500) in bucket_sizes(500, 300)   # the base size itself, even off the step


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 192).map(lambda k: 8 * k), st.integers(1, 192).map(lambda k: 8 * k))
def test_bucket_sizes_properties(width, height):
    sizes = bucket_sizes(width, height)
    step = 64
    assert (height, width) in sizes and sizes == sorted(set(sizes))
    for h, w in sizes:
        assert abs(h * w - width * height) <= 0.15 * width * height
        if (h, w) != (height, width):
            assert h % step == 0 and w % step == 0
            assert 0.5 - 1e-9 <= w / h <= 2.0 + 1e-9


def test_bucketing_wide_and_tall(tmp_path):
    wide = solid(tmp_path / "wide.png", size=(64, 32), caption="wide")
    tall = solid(tmp_path / "tall.png", size=(32, 64), caption="tall")
    sq = solid(tmp_path / "sq.png", size=(40, 40), caption="square")
    buckets = load_examples(str(tmp_path), 32, 32, bucket_step=8)
    where = {ex.caption: size for size, exs in buckets.items() for ex in exs}
    assert where["wide"][1] > where["wide"][0] and where["tall"][0] > where["tall"][1]
    assert where["square"] == (32, 32)
    for size, exs in buckets.items():
        assert all(ex.image.shape == (*size, 3) for ex in exs)
        assert size in bucket_sizes(32, 32, step=8)
    flat = load_examples([(wide, "w"), (tall, "t"), (sq, "s")], 32, 24, bucketing=False)
    assert list(flat) == [(24, 32)] and len(flat[(24, 32)]) == 3


# ------------------------------------------------------------------------------ graph input
def test_graph_one_caption_for_all():
    images = torch.rand(3, 24, 48, 3)
    buckets = examples_from_graph(images, ["  a  cat "], 32, 32, bucket_step=8)
    (size,) = buckets
    assert size[1] > size[0]                       # 2:1 batch -> a wide bucket
    exs = buckets[size]
    assert [e.caption for e in exs] == ["a cat"] * 3 and [e.source for e in exs] == [f"graph[{i}]" for i in range(3)]
    assert all(e.image.shape == (*size, 3) for e in exs)


def test_graph_caption_per_image_and_same_size_kept():
    images = torch.rand(2, 32, 32, 4)              # an alpha channel is dropped
    exs = examples_from_graph(images, ["one", "two"], 32, 32, bucket_step=8)[(32, 32)]
    assert [e.caption for e in exs] == ["one", "two"]
    assert torch.allclose(exs[1].image, images[1, ..., :3])
    assert examples_from_graph(images, "shared", 32, 32, bucket_step=8)[(32, 32)][1].caption == "shared"


def test_graph_errors():
    with pytest.raises(DatasetError, match="3 images but 2 captions"):
        examples_from_graph(torch.rand(3, 8, 8, 3), ["a", "b"], 8, 8, bucket_step=8)
    with pytest.raises(DatasetError, match="empty"):
        examples_from_graph(torch.zeros(0, 8, 8, 3), ["a"], 8, 8, bucket_step=8)
    with pytest.raises(DatasetError, match="caption 1 is empty"):
        examples_from_graph(torch.rand(2, 8, 8, 3), ["a", "  "], 8, 8, bucket_step=8)


# ------------------------------------------------------------------------------ prompts
def test_parse_prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\na cat\n\n   a dog on a skateboard  \n#a comment\nthe moon\n", encoding="utf-8")
    assert parse_prompts(str(path)) == ["a cat", "a dog on a skateboard", "the moon"]


def test_parse_prompts_string():
    assert parse_prompts("a cat\n  # not this\n\r\na red car \n") == ["a cat", "a red car"]
    assert parse_prompts("just one prompt") == ["just one prompt"]


@pytest.mark.parametrize("text", ["", "  \n\n", "# only\n#comments\n"])
def test_parse_prompts_empty(text, tmp_path):
    with pytest.raises(DatasetError, match="no prompts"):
        parse_prompts(text)
    (tmp_path / "p.txt").write_text(text)
    with pytest.raises(DatasetError, match="p.txt"):
        parse_prompts(str(tmp_path / "p.txt"))


def test_parse_prompts_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        parse_prompts(str(tmp_path / "missing.txt"))


# ------------------------------------------------------------------------------ sampler
def make_buckets(sizes):
    """{(s, s): [n examples]} for {s: n}; sources are unique ids."""
    return {(s, s): [Example(torch.zeros(s, s, 3), f"c{s}-{i}", f"{s}/{i}") for i in range(n)]
            for s, n in sizes.items()}


def draw(sampler, n):
    return [[e.source for e in sampler.next()] for _ in range(n)]


def test_sampler_reproducible_and_checkpointable():
    buckets = make_buckets({8: 3, 16: 5, 24: 2})
    a = BatchSampler(buckets, 4, torch.Generator().manual_seed(7))
    b = BatchSampler(buckets, 4, torch.Generator().manual_seed(7))
    assert draw(a, 30) == draw(b, 30)
    c = BatchSampler(buckets, 4, torch.Generator().manual_seed(8))
    assert draw(c, 30) != draw(BatchSampler(buckets, 4, torch.Generator().manual_seed(7)), 30)
    state = a.generator.get_state()
    ahead = draw(a, 10)
    a.generator.set_state(state)
    assert draw(a, 10) == ahead


def test_sampler_batches_stay_in_one_bucket():
    buckets = make_buckets({8: 3, 16: 5, 24: 1})
    sampler = BatchSampler(buckets, 6, torch.Generator().manual_seed(0))
    for _ in range(200):
        batch = next(sampler)
        assert len(batch) == 6
        assert len({tuple(e.image.shape) for e in batch}) == 1
        size = batch[0].image.shape[:2]
        assert all(e in buckets[tuple(size)] for e in batch)


def test_sampler_picks_bucket_proportional_to_size():
    buckets = make_buckets({8: 1, 16: 3, 24: 6})
    sampler = BatchSampler(buckets, 2, torch.Generator().manual_seed(123))
    n = 4000
    counts = {8: 0, 16: 0, 24: 0}
    seen = set()
    for _ in range(n):
        batch = sampler.next()
        counts[batch[0].image.shape[0]] += 1
        seen.update(e.source for e in batch)
    for s, share in ((8, 0.1), (16, 0.3), (24, 0.6)):
        assert math.isclose(counts[s] / n, share, abs_tol=0.03), counts
    assert len(seen) == 10                          # every example gets drawn


def test_sampler_errors():
    with pytest.raises(DatasetError, match="empty"):
        BatchSampler({(8, 8): []}, 2, torch.Generator())
    with pytest.raises(DatasetError, match="batch size"):
        BatchSampler(make_buckets({8: 1}), 0, torch.Generator())
