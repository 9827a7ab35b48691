"""The image domain: the bundled digits, patches to codes and back, exactly one image per sample, the
files it writes, and the figures it reports (nearest training image, a classifier's labels)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from multiar.domains.image import ImageDomain
from multiar.domains.image.analysis import patches, unpatch


@pytest.fixture(scope="module")
def digits():
    domain = ImageDomain()
    records = list(domain.read(domain.default_paths()[0]))
    torch.set_num_threads(1)  # tiny matrices: a second thread only contends
    domain.fit(records[:600])
    return domain, records


def test_the_bundled_digits_are_read_with_their_labels(digits):
    domain, records = digits
    assert len(records) == 1797 and {r.label for r in records} == {str(i) for i in range(10)}
    assert (
        records[0].pixels.shape == (8, 8, 1) and 0 <= records[0].pixels.min() <= records[0].pixels.max() <= 1
    )
    assert domain.fields(records[0]) == {"label": records[0].label}
    assert domain.units(records[0]) == 64


def test_patches_round_trip_and_codes_reconstruct_held_out_digits(digits):
    domain, records = digits
    x = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    assert np.array_equal(unpatch(patches(x, 2), 8, 2, 3), x)
    held_out = records[1500:1600]
    errors = [np.sqrt(((domain.decode(domain.encode(r))[0].pixels - r.pixels) ** 2).mean()) for r in held_out]
    assert all(len(domain.encode(r)) == 16 for r in held_out)
    assert np.mean(errors) < 0.1  # 128 codes of 2 x 2 patches: a digit stays legible (measured ~0.07)


def test_decode_repairs_a_short_or_long_code_sequence(digits):
    domain, records = digits
    ids = domain.encode(records[0])
    assert domain.decode(ids)[1] == 0
    image, repaired = domain.decode(ids[:10] + [domain.eos_id])
    assert image.pixels.shape == (8, 8, 1) and repaired == 1  # EOS dropped; 6 missing patches left blank
    assert domain.decode(ids + ids[:3])[1] == 3


def test_the_constraint_samples_exactly_one_image(digits):
    domain, _ = digits
    constraint = domain.constraint()
    v = domain.vocab_size
    short = torch.tensor([[domain.bos_id] + [3] * 5])
    full = torch.tensor([[domain.bos_id] + [3] * 16])
    logits = constraint(short, torch.zeros(1, v))
    assert logits[0, domain.eos_id] == float("-inf") and torch.isfinite(logits[0, 3:]).all()
    logits = constraint(full, torch.zeros(1, v))
    assert torch.isfinite(logits[0]).tolist() == [i == domain.eos_id for i in range(v)]


def test_save_and_load_keep_the_codebook_the_training_images_and_the_classifier(digits, tmp_path):
    domain, records = digits
    domain.save(tmp_path / "domain")
    loaded = ImageDomain.load(tmp_path / "domain")
    assert all(loaded.encode(r) == domain.encode(r) for r in records[1500:1520])
    samples = [r for r in records[1500:1520]]
    assert loaded.metrics(samples) == pytest.approx(domain.metrics(samples))
    assert loaded.vocab_size == domain.vocab_size == 3 + 128


def test_png_files_are_read_resized_in_the_domain_s_mode(tmp_path):
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[:8, :, 0] = 255  # top half red
    PILImage.fromarray(rgb).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    grey = next(ImageDomain(size=8).read(tmp_path / "a.png"))
    colour = next(ImageDomain(size=8, mode="RGB").read(tmp_path / "a.png"))
    assert grey.pixels.shape == (8, 8, 1) and colour.pixels.shape == (8, 8, 3)
    assert colour.pixels[0, 0, 0] == 1.0 and colour.pixels[7, 0, 0] == 0.0
    with pytest.raises(ValueError, match="not a readable image"):
        next(ImageDomain().read(tmp_path / "bad.png"))


def test_files_a_grid_and_the_classifier_s_figures(digits, tmp_path):
    domain, records = digits
    samples = [domain.decode(domain.encode(r))[0] for r in records[1500:1510]]
    paths = domain.write(samples, tmp_path, {"run": "r", "seed": 1})
    assert [p.name for p in paths] == [f"sample_{i:03d}.png" for i in range(10)]
    assert json.loads(PILImage.open(paths[0]).text["multiar"]) == {"run": "r", "seed": 1}
    (grid,) = domain.report(samples, [{}] * 10, tmp_path, overwrite=False)
    assert PILImage.open(grid).size == ((8 + 1) * 8 * 4 - 4, (8 + 1) * 2 * 4 - 4)
    details = [{"tags": f"label={r.label}"} for r in records[1500:1510]]
    figures = domain.assess(samples, details, {})
    labels = [d["label"] for d in details]
    # a held-out digit's own codes: the classifier (trained on 600 others) mostly names it right
    assert sum(a == r.label for a, r in zip(labels, records[1500:1510], strict=True)) >= 7
    assert 0.5 <= figures["image/label_as_asked"] <= 1.0
    copies = domain.metrics([records[0]])  # a training image itself: a copy (distance: 8-bit storage)
    assert copies["image/nearest_distance_mean"] < 0.002 and copies["image/copy_share"] == 1


def test_a_prompt_image_keeps_its_first_rows(digits, tmp_path):
    domain, records = digits
    PILImage.fromarray((records[3].pixels[..., 0] * 255).astype(np.uint8)).save(tmp_path / "seven.png")
    whole = domain.prompt_ids(str(tmp_path / "seven.png"))
    top = domain.prompt_ids(str(tmp_path / "seven.png"), prompt_rows=4)  # the top half: 2 patch rows
    assert whole[0] == top[0] == domain.bos_id and len(whole) == 17 and top == whole[:9]
    assert domain.prompt_ids(str(tmp_path / "seven.png"), prompt_rows=3) == top  # whole patch rows
    with pytest.raises(ValueError, match="prompt_rows=8"):
        domain.prompt_ids(str(tmp_path / "seven.png"), prompt_rows=8)


def test_a_tagged_digit_model_trains_generates_with_its_options_and_evaluates(tmp_path):
    from conftest import TINY

    from multiar.commands.evaluate import eval_run
    from multiar.commands.generate import sample_to_files
    from multiar.config import load_config
    from multiar.training.run import train

    run = tmp_path / "run"
    overrides = [*TINY, "domain=image", "data.tags=header:label", "data.max_documents=300"]
    overrides += [f"run_dir={run}", "trainer.max_steps=4", "trainer.val_check_interval=4"]
    train(load_config("train", overrides))
    report = sample_to_files(
        load_config(
            "generate", [f"run={run}", "n=4", "max_new_tokens=17", "tags=label=7", f"out={tmp_path / 'a'}"]
        )
    )
    assert report["metrics"]["image/eos_rate"] == 1 and report["metrics"]["image/new_tokens_mean"] == 16
    assert "image/label_as_asked" in report["metrics"] and (tmp_path / "a" / "grid.png").exists()
    # complete the bottom half of one of them: the top 4 pixel rows (2 patch rows) are kept
    prompt = tmp_path / "a" / "sample_000.png"
    args = [f"run={run}", "n=2", f"prompt={prompt}", "options.prompt_rows=4", f"out={tmp_path / 'b'}"]
    report = sample_to_files(load_config("generate", args))
    assert report["metrics"]["image/new_tokens_mean"] == 8 and report["provenance"]["prompt_rows"] == 4
    kept = np.asarray(PILImage.open(prompt))[:4]
    assert (
        np.abs(np.asarray(PILImage.open(tmp_path / "b" / "sample_000.png"))[:4].astype(int) - kept).max() <= 1
    )
    result = eval_run(load_config("eval", [f"run={run}", "n=0"]))
    assert result["unit"] == "pixel" and result["units"] == 64 * result["documents"]
    assert "untagged" in result and result["ppl"] < result["init"]["ppl"]
