"""Batches cut from images decoded once (imagelab.store): the same augmentation as fastai's per-item path."""
import random

import numpy as np
import pytest
import torch
from fastai.vision.all import PILImage, RandomResizedCrop, RandomSplitter, Resize, ResizeMethod, set_seed
from PIL import Image, ImageFilter

from imagelab.autoencoder import autoencoder_dls
from imagelab.data import Presized, classifier_dls, parent_label, presize
from imagelab.images import open_rgb, resize_box
from imagelab.store import ImageStore, StoreDL, crop_box, pixels, resized, store_loaders
from conftest import make_folder_dataset, write_image

# Landscape, portrait, square, and shapes outside RandomResizedCrop's aspect range (its fallback crop).
SHAPES = [(96, 72), (72, 120), (64, 64), (300, 40), (40, 300), (500, 333)]


def test_crop_boxes_are_fastais_random_resized_crop_draw_for_draw():
    rrc = RandomResizedCrop(64, min_scale=0.35)
    random.seed(7)
    theirs = []
    for i in range(3000):
        w, h = SHAPES[i % len(SHAPES)]
        rrc.before_call(PILImage.create(np.zeros((h, w, 3), np.uint8)), split_idx=0)
        theirs.append((*rrc.tl, *rrc.cp_size))
    random.seed(7)
    ours = [crop_box(*SHAPES[i % len(SHAPES)], 0.35, (3 / 4, 4 / 3)) for i in range(3000)]
    assert ours == theirs
    # the distribution RandomResizedCrop promises, where it does not fall back: area share, aspect, position
    regular = [(box, shape) for i, box in enumerate(ours) if (shape := SHAPES[i % len(SHAPES)]) in SHAPES[:3]]
    area = np.array([cw * ch / (w * h) for (_, _, cw, ch), (w, h) in regular])
    aspect = np.array([cw / ch for (_, _, cw, ch), _ in regular])
    centre = np.array([(left + cw / 2) / w for (left, _, cw, _), (w, _) in regular])
    assert area.min() > 0.33 and area.max() <= 1 and aspect.min() > 0.72 and aspect.max() < 1.38
    assert abs(centre.mean() - 0.5) < 0.01


def smooth_image(w, h, seed=0):
    pixels = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    return Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(2))


@pytest.mark.parametrize("box", [(0, 0, 160, 120), (10, 5, 100, 80), (30, 20, 50, 40)])
def test_crops_resize_like_pillow(box):
    """Downscaled and upscaled crops: within one grey level of fastai's Pillow crop-and-resize."""
    im = smooth_image(160, 120)
    left, top, w, h = box
    pil = np.asarray(im.crop((left, top, left + w, top + h)).resize((64, 64), Image.BILINEAR)).astype(int)
    tensor = torch.from_numpy(np.array(im)).permute(2, 0, 1)
    ours = pixels(resized(tensor[:, top:top + h, left:left + w], (64, 64)))[0].permute(1, 2, 0).numpy().astype(int)
    assert np.abs(pil - ours).max() <= 1 and np.abs(pil - ours).mean() < 0.3


@pytest.fixture(scope="module")
def loaders(tmp_path_factory):
    root = make_folder_dataset(tmp_path_factory.mktemp("store") / "data", n=10)
    for i in range(4):  # other shapes than the generated squares
        write_image(root / "cats" / f"wide_{i}.jpg", (220, 60, 60), size=(120, 50), seed=i)
    files = sorted(root.rglob("*.jpg"))
    presized = Presized(presize(files, 32))
    dls = classifier_dls(files, parent_label, splitter=RandomSplitter(0.2, seed=42), size=32,
                         min_scale=0.35, bs=4, workers=0, get_x=presized)
    return dls, store_loaders(dls, presized.copies)


def test_validation_batches_are_the_file_paths(loaders):
    """Unaugmented, as fastai validates: its batch transforms (warps and flips among them) take the split from
    their pipeline, which the store shares with the file path and must set itself (it is unset until a pass)."""
    dls, store = loaders
    assert isinstance(store.valid, StoreDL) and len(store.valid) == len(dls.valid)
    store.valid.after_batch.split_idx = None  # as before the first pass
    stored = list(store.valid)  # before the file path's pass, which would set the split for both
    for (x_file, y_file), (x_store, y_store) in zip(dls.valid, stored):
        assert torch.equal(y_file, y_store)
        assert x_file.shape == x_store.shape
        assert (x_file - x_store).abs().max() <= 2 / 255 + 1e-6  # fastai's squash + centre crop, within 2 levels


def test_training_batches_follow_the_size_and_the_random_streams(loaders):
    dls, store = loaders
    train = store.train
    assert len(train) == len(dls.train) and train.drop_last and train.shuffle

    shuffling = train.rng.getstate()

    def epoch():  # the random streams a checkpoint saves and --resume restores
        set_seed(3)
        train.rng.setstate(shuffling)
        return [x for x, _ in train]
    train.after_batch.split_idx = None  # as before the first pass
    first, again = epoch(), epoch()
    assert train.after_batch.split_idx == 0  # fastai's training augmentation, lighting included, applies
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # a resumed run draws the same crops
    assert first[0].shape == (4, 3, 32, 32)
    train.size = (16, 16)  # progressive resizing changes the size between epochs
    assert next(iter(train))[0].shape == (4, 3, 16, 16)
    train.size = (32, 32)


def test_training_batches_are_the_file_paths_draw_for_draw(loaders):
    """The same seed gives the same shuffle, crops, warps, flips and lighting on both paths: the store changes
    where the pixels come from, not what training sees (within the resampling's two grey levels)."""
    dls, store = loaders
    passes = []
    for dl in (store.train, dls.train):
        dl.after_batch.split_idx = None  # as before the first pass: each path must set it
        set_seed(11)  # the crops' and the augmentation's streams
        dl.rng.seed(11)  # the shuffle's
        passes.append(list(dl))
    assert len(passes[0]) == len(passes[1]) == len(dls.train)
    for (x_store, y_store), (x_file, y_file) in zip(*passes):
        assert torch.equal(y_store, y_file)
        assert (x_store - x_file).abs().max() <= 2 / 255 + 1e-6


def test_the_store_holds_each_image_as_open_rgb_decodes_it(tmp_path):
    """Each image goes straight to its place, sized from its header: a photo's EXIF turn included."""
    files = [tmp_path / "turned.jpg", tmp_path / "grey.png", tmp_path / "wide.jpg"]
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: shown turned a quarter
    smooth_image(40, 24, seed=1).save(files[0], exif=exif)
    smooth_image(20, 30, seed=2).convert("L").save(files[1])
    smooth_image(64, 16, seed=3).save(files[2])
    store = ImageStore(files, torch.device("cpu"))
    for i, f in enumerate(files):
        assert torch.equal(store.image(i), torch.from_numpy(np.array(open_rgb(f))).permute(2, 0, 1)), f
    assert store.shapes[0] == (40, 24)


def test_a_batched_cut_is_the_per_image_resize_within_a_grey_level(tmp_path):
    """The GPU's cut (one gather and two matrix products for a batch) against the CPU's (interpolate per image)."""
    files = []
    for i, (w, h) in enumerate(SHAPES):
        files.append(tmp_path / f"{i}.png")
        smooth_image(w, h, seed=i).save(files[-1])
    store = ImageStore(files, torch.device("cpu"))
    rng = random.Random(0)
    for total, offset, size in [((64, 48), (0, 0), (64, 48)), ((24, 24), (0, 0), (24, 24)),  # down, and up, scaling
                                ((600, 80), (0, 0), (600, 80)), ((40, 40), (4, 4), (32, 32))]:  # validation's centre
        boxes = [(i, *crop_box(w, h, 0.08, (3 / 4, 4 / 3), rng)) for i, (w, h) in enumerate(SHAPES * 4)
                 for i in [i % len(SHAPES)]]
        one_by_one = pixels(torch.cat([
            resized(store.image(i)[:, top:top + ch, left:left + cw], total)[..., offset[0]:offset[0] + size[0],
                                                                           offset[1]:offset[1] + size[1]]
            for i, left, top, cw, ch in boxes])).int()
        batched = pixels(store.cut(boxes, total, offset, size)).int()
        assert batched.shape == one_by_one.shape == (len(boxes), 3, *size)
        assert (batched - one_by_one).abs().max() <= 1 and (batched != one_by_one).float().mean() < 0.01


@pytest.mark.parametrize("which", ["loaders", "autoencoder_loaders"])
def test_batched_loaders_give_the_per_image_batches(which, request):
    _, store = request.getfixturevalue(which)
    for dl in (store.train, store.valid):
        batches = []
        for batched in (False, True):
            dl.batched = batched
            random.seed(5)  # the crops' stream
            batches.append(dl.batch(list(range(len(dl.store)))))
        dl.batched = False
        (x, y), (bx, by) = batches
        if dl.labels is None:  # the autoencoder's target is its input
            assert torch.equal(x, y) and torch.equal(bx, by)
        else:
            assert torch.equal(y, by)
        assert x.dtype == bx.dtype == torch.uint8
        assert x.shape == bx.shape and (x.int() - bx.int()).abs().max() <= 1


def test_resize_boxes_are_fastais_resize_crop():
    """The autoencoder's crop: fastai's `Resize` box at any place, for any image and output shape."""
    random.seed(3)
    for w, h in SHAPES + [(97, 61), (61, 97), (145, 144)]:
        for size in [(64, 64), (48, 32), (32, 48)]:  # fastai's (width, height)
            resize = Resize(size[::-1])  # fastai takes (height, width)
            for pcts in [(0.5, 0.5), (0.0, 1.0), (random.random(), random.random())]:
                resize.pcts = pcts
                image = PILImage.create(np.zeros((h, w, 3), np.uint8))
                captured = {}
                image.crop_pad = lambda sz, tl, **kw: captured.update(box=(*tl, *sz))
                resize.encodes(image)
                assert resize_box(w, h, size, pcts) == captured["box"]


@pytest.fixture(scope="module")
def autoencoder_loaders(tmp_path_factory):
    root = make_folder_dataset(tmp_path_factory.mktemp("store_ae") / "data", n=10)
    for i in range(6):  # wide and tall: the square's place along the long side is drawn
        write_image(root / "cats" / f"wide_{i}.jpg", (220, 60, 60), size=(120, 50), seed=i)
        write_image(root / "dogs" / f"tall_{i}.jpg", (60, 60, 220), size=(44, 110), seed=i)
    files = sorted(root.rglob("*.jpg"))
    presized = Presized(presize(files, 32))
    dls = autoencoder_dls(files, splitter=RandomSplitter(0.2, seed=42), size=32, bs=4, workers=0,
                          get_x=presized)
    return dls, store_loaders(dls, presized.copies)


def test_autoencoder_batches_are_the_file_paths_draw_for_draw(autoencoder_loaders):
    """fastai's `FlipItem` then `Resize` per item, on the file path and cut per batch from memory: the same
    shuffle, squares and flips, on the input and on the target alike."""
    dls, store = autoencoder_loaders
    assert isinstance(store.train, StoreDL) and store.train.drop_last and store.train.shuffle
    for file_dl, store_dl in ((dls.train, store.train), (dls.valid, store.valid)):
        passes = []
        for dl in (store_dl, file_dl):
            set_seed(11)
            dl.rng.seed(11)
            passes.append(list(dl))
        assert len(passes[0]) == len(passes[1]) == len(file_dl) > 0
        for (x_store, y_store), (x_file, y_file) in zip(*passes):
            assert x_store.shape == x_file.shape and x_store.shape[1:] == (3, 32, 32)
            assert torch.equal(x_store, y_store) and torch.equal(x_file, y_file)  # the target is the input
            assert (x_store - x_file).abs().max() <= 2 / 255 + 1e-6
    set_seed(5)
    flipped = store.train.crops.boxes([(48, 48)] * 400, (32, 32), True)[3]
    assert 0.4 < np.mean(flipped) < 0.6  # FlipItem's half of the training crops
    assert store.valid.crops.boxes([(48, 115)] * 4, (32, 32), False)[3] is None  # no flips in validation


@pytest.mark.parametrize("item_tfms, own_target", [([Resize(32, method=ResizeMethod.Squish)], True),
                                                   ([Resize(32), RandomResizedCrop(32)], True),
                                                   ([Resize(32)], False)])
def test_loaders_the_store_does_not_compute_read_files(tmp_path, item_tfms, own_target):
    """Loaders whose item transforms are anything but the two crops the store computes, or whose target is
    another image than the input, keep the file path."""
    from fastai.vision.all import DataBlock
    from imagelab.data import RGBImageBlock
    root = make_folder_dataset(tmp_path / "data", n=4)
    files = sorted(root.rglob("*.jpg"))
    presized = Presized(presize(files, 32))
    block = DataBlock(blocks=(RGBImageBlock(), RGBImageBlock()), get_x=presized,
                      get_y=presized if own_target else Presized(presized.copies),
                      splitter=RandomSplitter(0.25, seed=0), item_tfms=item_tfms)
    assert store_loaders(block.dataloaders(files, bs=2, num_workers=0), presized.copies) is None
