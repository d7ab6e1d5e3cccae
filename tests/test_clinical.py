"""Clinically-informed process: lung-function text, tokenizer, CLIP pre-training, text fusion."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from cirresdiff_bundle.runner import BUNDLE_ROOT
from custom.clinical.encoder import FrozenTextEncoder, TextEncoder
from custom.clinical.fusion import build_fusion
from custom.clinical.pretraining import (
    BatchNormRecalibration,
    CLIPModel,
    SymmetricContrastiveLoss,
    pretraining_cases,
    retrieval_report,
)
from custom.clinical.text import LungFunctionTextd, RecordError, build_tokenizer, record_to_text
from custom.data import DatasetSplit
from custom.networks import AttentionDiffusionUNet

RECORD = {"FVC": "2450", "Percent": "65.0", "Age": "71", "Sex": "Male", "SmokingStatus": "Ex-smoker", "DLCO": "48.5"}


def test_template_units_missing_fields_and_no_record():
    text = record_to_text(RECORD)
    assert "forced vital capacity 2450 ml" in text and "fvc 65.0 percent predicted" in text
    assert "age 71 years" in text and "smoking former smoker" in text and "peak expiratory flow not measured" in text
    partial = record_to_text({"FVC": 2000})
    assert "age not measured" in partial and "sex not measured" in partial
    assert record_to_text(None).count("not measured") == 7
    assert LungFunctionTextd("record")({"patient": "P1"})["text"] == record_to_text(None)


def test_text_also_goes_into_the_image_metadata_without_changing_the_callers_image():
    import numpy as np
    from monai.data import MetaTensor

    image = MetaTensor(np.zeros((1, 2, 2, 2), np.float32), affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    case = LungFunctionTextd("record", image_key="image")({"image": image, "record": RECORD, "patient": "P1"})
    assert case["image"].meta["text"] == case["text"] == record_to_text(RECORD)
    assert np.allclose(case["image"].affine, image.affine) and "text" not in image.meta
    assert "text" not in LungFunctionTextd("record")({"image": image, "record": RECORD})["image"].meta


@pytest.mark.parametrize("field,value", [("FVC", "-100"), ("Percent", "250"), ("Sex", "unknown"), ("Age", "old"),
                                         ("FVC", "nan"), ("SmokingStatus", "sometimes")])
def test_bad_records_name_patient_and_field(field, value):
    with pytest.raises(RecordError, match=f"P7.*{field}"):
        record_to_text({**RECORD, field: value}, patient="P7")


def test_tokenizer_keeps_digits_apart_and_knows_every_word():
    tokenizer = build_tokenizer()
    a = tokenizer(record_to_text({**RECORD, "FVC": 2450}))["input_ids"]
    b = tokenizer(record_to_text({**RECORD, "FVC": 2540}))["input_ids"]
    assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 2  # two digit tokens swapped
    assert tokenizer.unk_token_id not in a
    assert tokenizer.unk_token_id not in tokenizer(record_to_text(None))["input_ids"]


def _images_for(records, generator):
    """Images whose content depends on the record (a dense blob growing as % predicted falls)."""
    images = torch.rand(len(records), 1, 16, 16, 16, generator=generator) * 0.1
    for i, rec in enumerate(records):
        size = int(2 + (100 - float(rec["Percent"])) / 8)
        images[i, :, :size, :size, :size] += 0.8
    return images


def test_clip_loss_decreases_on_a_small_cohort():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    records = [{**RECORD, "Percent": str(40 + 7 * i), "FVC": str(1500 + 200 * i)} for i in range(8)]
    texts = [record_to_text(r) for r in records]
    images = _images_for(records, g)
    model = CLIPModel(TextEncoder(hidden_size=64, num_layers=1, num_heads=2), embed_dim=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = SymmetricContrastiveLoss()
    losses = []
    for _ in range(30):
        loss = loss_fn(model(images, texts))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])


def test_retrieval_ranks_chance_levels_and_permutation_p_values():
    # Own image ranked 1st, 2nd, 3rd and 4th for texts 0-3 (rows: texts, columns: images).
    similarity = torch.tensor([[0.9, 0.1, 0.2, 0.3], [0.1, 0.8, 0.9, 0.0], [0.5, 0.6, 0.4, 0.0], [0.7, 0.6, 0.5, 0.1]])
    report = retrieval_report(similarity, permutations=200)
    assert report["top1"] == 0.25 and report["top5"] == 1.0 and report["mean_rank"] == 2.5
    assert report["median_rank"] == 2.0 and report["median_rank_chance"] == 2.5 and report["top1_chance"] == 0.25
    assert report["p_value_top5"] == 1.0  # with 4 candidates every pairing has all ranks <= 5

    g = torch.Generator().manual_seed(0)
    aligned = retrieval_report(torch.eye(40) + 0.5 * torch.rand(40, 40, generator=g), permutations=1000)
    assert aligned["top1"] == 1.0 and aligned["p_value_mean_rank"] == aligned["p_value_top5"] == 1 / 1001
    reversed_ = retrieval_report(-torch.eye(40), permutations=1000)
    assert reversed_["top5"] == 0.0 and reversed_["median_rank"] == 40 and reversed_["p_value_mean_rank"] == 1.0
    with pytest.raises(ValueError, match="square"):
        retrieval_report(torch.rand(3, 4))


def test_batch_norm_recalibration_uses_the_clean_data_of_the_final_weights():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).eval()
    with torch.no_grad():
        module.train()(5.0 + torch.randn(64, 3))  # statistics of other (augmented) data
    module.eval()
    clean = [{"image": torch.randn(16, 3)} for _ in range(4)]
    BatchNormRecalibration(module, clean)()
    with torch.no_grad():
        features = module[0](torch.cat([b["image"] for b in clean]))
    bn = module[1]
    assert torch.allclose(bn.running_mean, features.mean(0), atol=1e-5)
    assert bn.momentum == 0.1 and not module.training and int(bn.num_batches_tracked) == 4


def test_leakage_guard_refuses_a_test_patient_in_pretraining(tmp_path):
    entries = {"training": [{"patient": "A", "fold": 0}, {"patient": "T", "fold": 1}], "testing": [{"patient": "T"}]}
    (tmp_path / "datalist.json").write_text(json.dumps(entries), encoding="utf-8")
    with pytest.raises(ValueError, match="test patients"):
        pretraining_cases(DatasetSplit(tmp_path / "datalist.json", val_fold=None))


@pytest.mark.parametrize("mode", ["standard", "paper"])
def test_context_changes_the_denoiser_and_gradients_stop_at_the_frozen_encoder(tmp_path, mode):
    torch.manual_seed(0)
    TextEncoder(hidden_size=32, num_layers=1, num_heads=2).save(tmp_path / "enc")
    encoder = FrozenTextEncoder(tmp_path / "enc")
    net = AttentionDiffusionUNet(channels=(8, 16, 16), attention_levels=(False, True, True), num_head_channels=8,
                                 context_dim=32, fusion_mode=mode)
    for name, p in net.named_parameters():
        if ".fusion." in name:
            p.data.add_(0.05 * torch.randn_like(p))  # leave the zero-initialised output projections
    x = torch.rand(2, 2, 16, 16, 16)
    t = torch.tensor([3, 9])
    a = net(x, t, encoder([record_to_text(RECORD)] * 2))
    b = net(x, t, encoder([record_to_text({**RECORD, "Percent": "95.0"})] * 2))
    assert not torch.allclose(a, b)
    a.mean().backward()
    fusion_grads = [p.grad for n, p in net.named_parameters() if ".fusion." in n]
    assert fusion_grads and all(g is not None and g.abs().sum() > 0 for g in fusion_grads)
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())


def test_paper_fusion_bias_covers_any_grid():
    block = build_fusion("paper", 8, 4, num_heads=2)
    assert block.relative_bias((3, 4, 5), torch.device("cpu")).shape == (2, 60, 60)
    assert block(torch.rand(1, 8, 3, 4, 5), torch.rand(1, 6, 4)).shape == (1, 8, 3, 4, 5)


def test_pretrain_config_writes_a_reloadable_text_encoder(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from cirresdiff_bundle.runner import run_config

    g = torch.Generator().manual_seed(1)
    entries = {"training": [], "testing": []}
    for i in range(6):
        rec = {**RECORD, "Percent": str(45 + 8 * i)}
        (tmp_path / f"P{i}").mkdir()
        image = _images_for([rec], g)[0, 0].numpy()
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(tmp_path / f"P{i}" / "image.nii.gz"))
        nib.save(nib.Nifti1Image(np.ones_like(image), np.eye(4)), str(tmp_path / f"P{i}" / "mask.nii.gz"))
        entry = {"patient": f"P{i}", "image": f"P{i}/image.nii.gz", "mask": f"P{i}/mask.nii.gz", "record": rec}
        (entries["training"] if i < 5 else entries["testing"]).append({**entry, "fold": i % 5})
    (tmp_path / "datalist.json").write_text(json.dumps(entries), encoding="utf-8")
    run_config(["pretrain_clip"], dataset_dir=str(tmp_path), ckpt_dir=str(tmp_path / "models"),
               output_dir=str(tmp_path / "runs"), max_epochs=2, batch_size=4, image_size=[16, 16, 16])
    folder = tmp_path / "models" / "text_encoder"
    model = AutoModel.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    out = model(**tokenizer([record_to_text(RECORD)], return_tensors="pt")).last_hidden_state
    assert out.shape[-1] == model.config.hidden_size

    report_path = tmp_path / "clip_eval.json"
    subprocess.run([sys.executable, str(BUNDLE_ROOT / "scripts" / "evaluate_clip.py"), "--dataset", str(tmp_path),
                    "--checkpoint", str(tmp_path / "runs" / "last.pt"), "--all-cases", "--image-size", "16", "16", "16",
                    "--out", str(report_path)], check=True, capture_output=True, timeout=300)
    report = json.loads(report_path.read_text(encoding="utf-8"))
    trained = report["retrieval_trained"]
    assert trained["cases"] == 6 and trained["top5_chance"] == 5 / 6 and 0 < trained["p_value_mean_rank"] <= 1
    assert set(report["cosine_distance_trained"]) == {"FVC 2000 vs 3000 ml", "Percent 50 vs 90", "DLCO 30 vs 80"}
