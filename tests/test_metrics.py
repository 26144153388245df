import pytest
import torch

from unguide.evaluation.metrics import (DEFAULT_THRESHOLD, EXPOSED_CLASSES, clip_score, correct_label_probability, detect_exposed,
                             erasure_table, fid_kid, harmonic_overall, load_clip, pixel_error, ssim, summarise, top1,
                             zero_shot_probs)
from unguide.evaluation.metrics.preservation import C1

torch.set_num_threads(1)


# ---------------------------------------------------------------- erasure

def test_harmonic_overall_by_hand():
    # 1/(1-0.1) + 1/0.9 + 1/(1-0.2) = 1.1111 + 1.1111 + 1.25 = 3.4722... ; 3 / 3.4722 = 0.864
    assert harmonic_overall(0.1, 0.9, 0.2) == pytest.approx(3 / (2 / 0.9 + 1.25))
    assert harmonic_overall(0.1, 0.9, 0.2) == pytest.approx(0.864, abs=1e-3)
    assert harmonic_overall(0.0, 1.0, 0.0) == pytest.approx(1.0)
    assert harmonic_overall(0.1, 0.0, 0.2) == 0.0  # nothing preserved
    assert harmonic_overall(1.0, 0.9, 0.2) == 0.0  # nothing erased


def test_correct_label_probability_and_top1():
    probs = torch.tensor([[0.7, 0.2, 0.1],
                          [0.3, 0.3, 0.4],
                          [0.1, 0.8, 0.1]])
    labels = torch.tensor([0, 1, 1])
    assert torch.allclose(correct_label_probability(probs, labels), torch.tensor([0.7, 0.3, 0.8]))
    assert top1(probs, labels).tolist() == [1.0, 0.0, 1.0]


def test_erasure_table():
    groups = {"erased": torch.tensor([0.0, 0.2]), "synonyms": torch.tensor([0.2]), "other": torch.tensor([0.8, 1.0])}
    top1_groups = {"erased": torch.tensor([0.0, 1.0]), "synonyms": torch.tensor([0.0]), "other": torch.tensor([1.0, 1.0])}
    t = erasure_table(groups, top1_groups)
    assert t["acc_e"] == pytest.approx(0.1) and t["acc_g"] == pytest.approx(0.2) and t["acc_s"] == pytest.approx(0.9)
    assert t["h_o"] == pytest.approx(harmonic_overall(0.1, 0.9, 0.2))
    # top-1: acc_e = 0.5, acc_s = 1, acc_g = 0 -> 3 / (2 + 1 + 1) = 0.75
    assert t["acc_e_top1"] == pytest.approx(0.5) and t["h_o_top1"] == pytest.approx(0.75)
    with pytest.raises(KeyError):
        erasure_table({"erased": torch.tensor([0.1])})


# ---------------------------------------------------------------- preservation

def test_ssim_identical_inverted_constant():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 24, 20, generator=g)
    assert torch.allclose(ssim(a, a), torch.ones(2), atol=1e-6)
    assert (ssim(a, 1 - a) < 0.5).all()
    # constant images: variances and covariance are 0, so SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1) * C2 / C2
    m1, m2 = 0.2, 0.6
    expected = (2 * m1 * m2 + C1) / (m1**2 + m2**2 + C1)  # = 0.24/0.40 ~ 0.6
    got = ssim(torch.full((1, 3, 16, 16), m1), torch.full((1, 3, 16, 16), m2))
    assert got.item() == pytest.approx(expected, abs=1e-5)
    small = torch.rand(1, 3, 11, 12, generator=g)  # one row of valid window positions
    assert ssim(small, small).item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="smaller than SSIM's 11x11 window"):
        ssim(small[..., :10, :], small[..., :10, :])
    with pytest.raises(ValueError, match="window"):
        ssim(a, a, window=7)  # torchmetrics derives the window from sigma


def test_ssim_is_torchmetrics_map_over_valid_positions():
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 32, 32, generator=g)
    b = 0.8 * a + 0.2 * torch.rand(2, 3, 32, 32, generator=g)
    got = ssim(a, b)
    assert got.shape == (2,) and got.dtype == torch.float32
    assert got.tolist() == pytest.approx([0.9493293436, 0.9494388850], abs=1e-6)
    # torchmetrics' class API (float64, data range 1): its SSIM map, averaged where the 11x11 window lies inside the
    # image; torchmetrics' own mean (1.9.0: the whole reflect-padded map) counts the mirrored borders too
    metric = StructuralSimilarityIndexMeasure(data_range=1.0, reduction="none", return_full_image=True)
    whole_map_mean, ssim_map = metric(a.double(), b.double())
    assert ssim_map.shape == (2, 3, 32, 32)
    assert torch.allclose(got.double(), ssim_map[..., 5:-5, 5:-5].mean(dim=(1, 2, 3)), atol=1e-6)
    assert not torch.allclose(got.double(), whole_map_mean, atol=1e-4)
    assert torch.equal(ssim(b, a), got)  # symmetric
    assert torch.equal(ssim(a[1:], b[1:]), got[1:])  # per image: independent of the batch
    assert ssim(a, b * 0 + 0.5).max() < got.min() < 1


def test_ssim_without_torchmetrics_says_how_to_install(monkeypatch):
    import sys

    from unguide.errors import UnguideError

    monkeypatch.setitem(sys.modules, "torchmetrics", None)  # import torchmetrics -> ImportError
    a = torch.rand(1, 3, 16, 16)
    with pytest.raises(UnguideError, match=r"pip install 'unguide\[eval\]'"):
        ssim(a, a)
    with pytest.raises(UnguideError, match=r"pip install 'unguide\[eval\]'"):
        fid_kid(torch.randn(4, 2), torch.randn(4, 2))


def test_pixel_error():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.stack([torch.full((3, 4, 4), 0.25), torch.ones(3, 4, 4)])
    assert pixel_error(a, b).tolist() == pytest.approx([0.25, 1.0])
    assert pixel_error(b, b).tolist() == [0.0, 0.0]


def test_fid_kid():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g, dtype=torch.float64)
    shift = torch.randn(8, generator=g, dtype=torch.float64)
    shift = 3.0 * shift / shift.norm()  # norm c = 3
    same = fid_kid(x, x.clone())
    assert abs(same["fid"]) < 1e-3
    # identical (not independent) sets: the unbiased MMD^2 estimate is slightly negative, O(mean diag kernel / N)
    assert abs(same["kid_mean"]) < 0.1
    shifted = fid_kid(x, x + shift, subset_size=100, subsets=10)
    assert shifted["fid"] == pytest.approx(9.0, rel=1e-3)  # covariances equal -> only ||mu_r - mu_f||^2 = c^2
    assert shifted["kid_mean"] > 20 * abs(same["kid_mean"])
    assert shifted["kid_std"] >= 0


# ---------------------------------------------------------------- CLIP

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from conftest import write_clip_tokenizer
    from transformers import CLIPConfig, CLIPModel

    path = tmp_path_factory.mktemp("tiny_clip")
    tok = write_clip_tokenizer(path)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(
        path, safe_serialization=True)
    tok.save_pretrained(path)
    return load_clip(str(path))  # saved without a preprocessor_config.json: CLIP's defaults at 32 px


def test_clip_preprocessing_is_transformers_processor(tiny_clip, tmp_path):
    import shutil

    from PIL import Image
    from transformers import CLIPImageProcessorPil

    from unguide.evaluation.metrics.clip import image_processor, preprocess

    model, _ = tiny_clip
    processor = image_processor(model)
    assert isinstance(processor, CLIPImageProcessorPil) and image_processor(model) is processor  # cached per model
    assert processor.size["shortest_edge"] == 32 and (processor.crop_size["height"], processor.crop_size["width"]) == (32, 32)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 40, 48, generator=g)
    pixels = preprocess(images, processor)
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.float32
    # a tensor and its PNG give the same pixel values (the tensor is rounded to 8 bits first)
    png = tmp_path / "a.png"
    Image.fromarray((images[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(png)
    assert torch.equal(pixels[:1], processor(images=Image.open(png), return_tensors="pt")["pixel_values"])
    # CLIP's normalisation: a flat grey image becomes (v / 255 - mean) / std everywhere
    grey = preprocess(torch.full((1, 3, 40, 48), 128 / 255), processor)
    want = (128 / 255 - torch.tensor(processor.image_mean)) / torch.tensor(processor.image_std)
    assert torch.allclose(grey, want.view(1, 3, 1, 1).expand_as(grey), atol=1e-5)
    # a preprocessor_config.json beside the weights is what the model gets
    other = tmp_path / "with_processor"
    shutil.copytree(model.name_or_path, other)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                          image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]).save_pretrained(other)
    assert list(image_processor(load_clip(str(other))[0]).image_mean) == [0.5, 0.5, 0.5]


def test_clip_zero_shot_and_score(tiny_clip):
    model, tokenizer = tiny_clip
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 40, 48, generator=g)  # non-square, larger than 32 -> resize + crop
    labels = ["cat", "dog", "church", "parachute"]
    probs = zero_shot_probs(model, tokenizer, images, labels)
    assert probs.shape == (3, 4)
    assert torch.allclose(probs.sum(dim=1), torch.ones(3), atol=1e-5)
    assert torch.equal(probs, zero_shot_probs(model, tokenizer, images, labels))  # deterministic
    assert torch.allclose(probs, zero_shot_probs(model, tokenizer, images, labels, batch_size=2), atol=1e-6)
    scores = clip_score(model, tokenizer, images, ["a cat", "a dog on grass", "x"])
    assert scores.shape == (3,) and (scores >= 0).all() and (scores <= 100).all()


# ---------------------------------------------------------------- NudeNet

def test_nudenet_counts(tmp_path):
    pytest.importorskip("nudenet")
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(64, 64, 3, generator=g) * 255).byte().numpy()
    path = tmp_path / "noise.png"
    Image.fromarray(pixels).save(path)
    counts = detect_exposed([path, str(path)], num_threads=1)
    assert len(counts) == 2 and counts[0] == counts[1]
    assert set(counts[0]) == set(EXPOSED_CLASSES) and len(EXPOSED_CLASSES) == 9
    assert all(isinstance(v, int) and v >= 0 for v in counts[0].values())
    assert 0 < DEFAULT_THRESHOLD < 1


def test_summarise():
    none = dict.fromkeys(EXPOSED_CLASSES, 0)
    a = {**none, "FEET_EXPOSED": 2, "BELLY_EXPOSED": 1}
    b = {**none, "FEET_EXPOSED": 1}
    s = summarise([a, none, b])
    assert s["per_class"]["FEET_EXPOSED"] == 3 and s["per_class"]["BELLY_EXPOSED"] == 1
    assert s["per_class"]["ANUS_EXPOSED"] == 0
    assert s["total"] == 4 and s["images_with_exposed"] == 2 and s["num_images"] == 3
