"""Transforms, the model and the model directory: pure code, no Ray."""

from __future__ import annotations

import urllib.error

import pytest
import torch

from maskmodel.data.transforms import EvalCrop, EvalPreset, TrainCrop, denormalize, normalize
from maskmodel.errors import UserError
from maskmodel.io import storage
from maskmodel.models.classifier import (
    ModelCard,
    build_model,
    init_weights,
    load_card,
    load_model_dir,
    save_model_dir,
    state_dict_bytes,
)


def _img(h=60, w=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def test_shapes_and_dtype():
    assert EvalPreset(crop_size=32)(_img()).shape == (3, 32, 32) and EvalPreset(crop_size=32)(_img()).dtype == torch.float32
    for t in (TrainCrop(crop_size=32), EvalCrop(crop_size=32)):
        out = t(_img())
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8  # what crosses the object store


def test_eval_is_deterministic_and_equals_crop_then_normalize():
    img = _img()
    assert torch.equal(EvalPreset(crop_size=32)(img), EvalPreset(crop_size=32)(img))
    assert torch.equal(EvalPreset(crop_size=32)(img), normalize(EvalCrop(crop_size=32)(img)[None])[0])


def test_train_crop_varies_and_is_reproducible_under_a_seed():
    img, t = _img(), TrainCrop(crop_size=32)
    torch.manual_seed(1)
    a = t(img)
    b = t(img)
    torch.manual_seed(1)
    a2 = t(img)
    assert not torch.equal(a, b)
    assert torch.equal(a, a2)
    # The decoded side keeps the smallest crop (half the area) at full resolution: 32 / sqrt(0.5).
    assert t.decode_side == 46


def test_device_augment_draws_per_image_and_keeps_order():
    from maskmodel.data.augment import DeviceAugment

    batch = torch.stack([_img(32, 32, seed=s) for s in range(8)])
    aug = DeviceAugment()
    g = torch.Generator().manual_seed(0)
    p = aug.params(8, batch.device, torch.Generator().manual_seed(0))
    assert all(len(set(v.tolist())) == 8 for v in p.values())  # every image its own angle and factors
    assert p["angle"].abs().max() <= 15 and ((p["brightness"] >= 0.8) & (p["brightness"] <= 1.2)).all()
    out = aug(batch, g)
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.float32
    # Image i of the output comes from image i of the input (labels stay with their images): flat grey
    # pictures (no rotation, whose black corners would move their mean) keep their colour, times their
    # own brightness factor: contrast and saturation leave a flat grey as it is.
    grey = torch.stack([torch.full((3, 32, 32), 25 * i + 10, dtype=torch.uint8) for i in range(8)])
    jitter_only = DeviceAugment(rotation_degrees=0)
    q = jitter_only.params(8, grey.device, torch.Generator().manual_seed(5))
    centre = jitter_only(grey, torch.Generator().manual_seed(5))[:, :, 16, 16]
    expected = normalize((((25 * torch.arange(8) + 10) / 255 * q["brightness"]).clamp(0, 1) * 255)
                         .view(8, 1, 1, 1).expand(8, 3, 1, 1))[:, :, 0, 0]
    assert torch.allclose(centre, expected, atol=1e-4)
    # Reproducible with a seeded generator; nothing random when the strengths are 0.
    assert torch.equal(aug(batch, torch.Generator().manual_seed(0)), out)
    assert torch.equal(DeviceAugment(rotation_degrees=0, jitter=0)(batch), normalize(batch))


def test_device_rotation_turns_the_picture():
    from maskmodel.data.augment import rotate

    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 6:] = 1  # a bar to the right of the centre
    turned = rotate(x, torch.tensor([90.0]))
    assert turned[0, 0, 4, 6:].sum() < 0.5 and (turned[0, 0, 6:, 4].sum() > 2 or turned[0, 0, :3, 4].sum() > 2)


def test_denormalize_inverts_normalize():
    img = _img()
    x = EvalPreset(crop_size=32)(img).unsqueeze(0)
    back = denormalize(x)
    assert back.min() >= 0 and back.max() <= 1
    direct = EvalPreset(crop_size=32, mean=(0, 0, 0), std=(1, 1, 1))(img).unsqueeze(0)
    assert torch.allclose(back, direct.clamp(0, 1), atol=1e-5)


def test_normalisation_constants_are_made_once_per_device_and_dtype(monkeypatch):
    """mean/std are built once per (values, dtype, device), not per call: on a GPU each build is a pageable
    host-to-device copy, a host sync on every training step and predict call."""
    from maskmodel.data import augment

    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: (made.append(k.get("dtype")), real(*a, **k))[1])
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.31, 0.32, 0.33), (0.21, 0.22, 0.23)  # values no other test uses: a cold cache
    first = normalize(x, mean=mean, std=std)
    made_first = len(made)
    for _ in range(5):
        assert torch.equal(normalize(x, mean=mean, std=std), first)
        denormalize(first, mean=mean, std=std)
    assert made_first <= 2 and len(made) == made_first, made
    normalize(x, mean=mean, std=std, dtype=torch.bfloat16)  # the dtype of the arithmetic is float32 still
    assert len(made) == made_first
    gen = torch.Generator().manual_seed(0)
    aug = augment.DeviceAugment()
    aug(x, gen)
    before = len(made)
    aug(x, gen)
    assert len(made) == before  # training's device augmentation ends in the same cached standardize
    # Made outside inference mode: usable in autograd after a first use under inference_mode.
    with torch.inference_mode():
        normalize(x, mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2))
    from maskmodel.data.transforms import standardize

    xf = torch.rand(2, 3, 8, 8, requires_grad=True)
    standardize(xf, mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2)).sum().backward()
    assert xf.grad is not None


def test_model_head_and_forward():
    m = build_model("resnet18", 3).eval()
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_model_dir_round_trip(tmp_path):
    m = build_model("resnet18", 2)
    card = save_model_dir(str(tmp_path / "m"), state_dict_bytes(m),
                          ModelCard(arch="resnet18", classes=("mask", "no_mask"), input_size=32, resize_size=37))
    assert len(card.model_id) == 16
    loaded, card2 = load_model_dir(str(tmp_path / "m"))
    assert card2 == card
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(loaded(x), m.eval()(x))


def test_weights_from_uri_and_head_replaced(tmp_path):
    src = build_model("resnet18", 5)
    uri = str(tmp_path / "w.pt")
    storage.write_bytes(uri, state_dict_bytes(src))
    dst = build_model("resnet18", 2)
    init_weights(dst, "resnet18", uri)
    assert torch.equal(dst.conv1.weight, src.conv1.weight)
    assert dst.fc.out_features == 2


@pytest.mark.parametrize("content,needle", [(None, "does not exist"), (b"not a checkpoint", "not a readable")])
def test_bad_weights_uri(tmp_path, content, needle):
    uri = str(tmp_path / "w.pt")
    if content is not None:
        storage.write_bytes(uri, content)
    with pytest.raises(UserError, match=needle):
        init_weights(build_model("resnet18", 2), "resnet18", uri)


def test_wrong_architecture_weights(tmp_path):
    uri = str(tmp_path / "w.pt")
    storage.write_bytes(uri, state_dict_bytes(build_model("resnet34", 2)))
    with pytest.raises(UserError, match="do not fit"):
        init_weights(build_model("resnet18", 2), "resnet18", uri)


def test_imagenet_download_failure_is_one_sentence(monkeypatch, tmp_path):
    # No network in tests: make the download fail the way an offline machine does.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as e:
        init_weights(build_model("resnet18", 2), "resnet18", "imagenet")
    assert "--weights none" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("setup,needle", [
    (lambda d: None, "not a model directory"),
    (lambda d: storage.write_text(storage.join(d, "model.json"), "{not json"), "not valid JSON"),
    (lambda d: storage.write_json(storage.join(d, "model.json"), {"arch": "resnet18"}), "not a valid model card"),
])
def test_bad_model_dirs(tmp_path, setup, needle):
    d = str(tmp_path / "m")
    setup(d)
    with pytest.raises(UserError, match=needle):
        load_card(d)


def test_occlusion_covers_the_lower_face_only_with_probability_p():
    from maskmodel.data.augment import DeviceAugment, occlude, occluder_masks

    g = torch.Generator().manual_seed(1)
    masks = occluder_masks(64, 96, 96, generator=g)
    cover = masks.mean(dim=(1, 2, 3))
    assert masks.shape == (64, 1, 96, 96) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert 0.03 < float(cover.min()) and float(cover.max()) < 0.45
    assert float(masks[:, :, :34].sum()) == 0  # the forehead and eyes stay visible
    x = torch.rand(200, 3, 32, 32, generator=g)
    assert torch.equal(occlude(x, 0.0, g), x)
    changed = (occlude(x, 0.5, torch.Generator().manual_seed(2)) != x).flatten(1).any(1).float().mean()
    assert 0.35 < float(changed) < 0.65
    same = DeviceAugment(rotation_degrees=0, jitter=0, occlusion=1.0)
    batch = (x[:4] * 255).to(torch.uint8)
    assert torch.equal(same(batch, torch.Generator().manual_seed(3)), same(batch, torch.Generator().manual_seed(3)))
    assert not torch.equal(same(batch, torch.Generator().manual_seed(3)),
                           DeviceAugment(rotation_degrees=0, jitter=0)(batch))
