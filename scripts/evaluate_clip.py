"""Held-out retrieval and number sensitivity of the CLIP-pretrained lung-function text encoder.

    python scripts/evaluate_clip.py --dataset data/prepared --checkpoint runs/demo/pretrain_clip/last.pt \\
        --image-size 32 32 32

- text-to-image retrieval on patients never seen in pre-training (the test split, or with
  ``--all-cases`` every case of another prepared cohort, e.g. a new seed): for each record's text,
  the rank of its own patient's image among all those images; top-1 and top-5 accuracy and the
  median rank against chance, and permutation p-values against random pairings
  (``custom.clinical.pretraining.retrieval_report``);
- number sensitivity: cosine distance between the text embeddings of records that differ only in
  FVC (2000 vs 3000 ml), % predicted (50 vs 90) or DLCO (30 vs 80 %), for the untrained encoder
  and the pre-trained one (a general text encoder barely separates them; pre-training must);
- a reference: the retrieval a hand-made lesion-density model of the cohort reaches
  (``reference_retrieval``), to read the learnt figures against what the data allow.

Images and texts go through ``configs/pretrain_clip.json``'s deterministic ``preprocessing`` and
the models are its ``network_def``, so the evaluation sees what pre-training saw.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cirresdiff_bundle.runner import BUNDLE_ROOT  # noqa: E402
from custom.clinical.pretraining import CLIPModel, retrieval_report  # noqa: E402
from custom.clinical.text import record_to_text  # noqa: E402
from custom.data import DatasetSplit  # noqa: E402
from custom.io import write_json  # noqa: E402

DENSE = 0.2
"""Lesion density threshold of the reference, in the [0, 1] HU window (-760 HU)."""
BASE = {"FVC": 2500, "Percent": 70, "Age": 70, "Sex": "Male", "SmokingStatus": "Ex-smoker", "DLCO": 55}


def number_distances(model: CLIPModel) -> dict[str, float]:
    """Cosine distances of text embeddings for records differing in one number only."""
    pairs = {"FVC 2000 vs 3000 ml": ({**BASE, "FVC": 2000}, {**BASE, "FVC": 3000}),
             "Percent 50 vs 90": ({**BASE, "Percent": 50}, {**BASE, "Percent": 90}),
             "DLCO 30 vs 80": ({**BASE, "DLCO": 30}, {**BASE, "DLCO": 80})}
    out = {}
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            ea, eb = model.embed_text([record_to_text(a), record_to_text(b)])
            out[name] = float(1 - F.cosine_similarity(ea, eb, dim=0))
    return out


def retrieval(model: CLIPModel, items: list[dict]) -> dict[str, float]:
    """Text-to-image retrieval of the preprocessed ``items`` (``image`` and ``text`` each)."""
    with torch.no_grad():
        images = model.embed_image(torch.stack([item["image"] for item in items]))
        texts = model.embed_text([item["text"] for item in items])
    return retrieval_report(texts @ images.t())


def reference_retrieval(cases: list[dict], dense: float = DENSE) -> dict[str, float]:
    """What a hand-made model of this cohort's image-text link achieves (a reference point).

    The image side is the fraction of lung voxels denser than ``dense`` (window units; 0.2 is
    -760 HU), the text side a least-squares fit of that fraction to % predicted and DLCO on these
    same cases (optimistic: fitted on the cases it is scored on); images are ranked by how close
    their fraction is to the text's prediction.
    """
    import numpy as np
    from monai.transforms import LoadImaged

    load = LoadImaged(["image", "mask"], image_only=True)
    density = []
    for case in cases:
        data = load({"image": case["image"], "mask": case["mask"]})
        inside = torch.as_tensor(data["mask"]) > 0
        density.append(float((torch.as_tensor(data["image"])[inside] > dense).float().mean()))
    fields = np.array([[1.0, float(c["record"]["Percent"]), float(c["record"]["DLCO"])] for c in cases])
    coef, *_ = np.linalg.lstsq(fields, np.array(density), rcond=None)
    predicted = torch.as_tensor(fields @ coef, dtype=torch.float32)
    return retrieval_report(-(predicted[:, None] - torch.tensor(density)[None, :]).abs())


def main() -> None:
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True, help="prepared dataset folder")
    parser.add_argument("--checkpoint", type=Path, required=True, help="pretrain_clip.json's last.pt")
    parser.add_argument("--all-cases", action="store_true",
                        help="use every case of the datalist (a cohort none of whose patients was in pre-training)")
    parser.add_argument("--image-size", type=int, nargs=3, default=None,
                        help="image_size of the pre-training if it was overridden (the demo uses 32 32 32)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report to this JSON file")
    args = parser.parse_args()
    config = ConfigParser()
    config.read_config(str(BUNDLE_ROOT / "configs" / "pretrain_clip.json"))
    config["bundle_root"] = str(BUNDLE_ROOT)
    if args.image_size:
        config["image_size"] = args.image_size
    split = DatasetSplit(args.dataset / "datalist.json", val_fold=None)
    cases = split.training() + split.testing() if args.all_cases else split.testing()
    preprocessing = Compose(config.get_parsed_content("preprocessing", instantiate=True))
    items = [preprocessing(case) for case in cases]
    torch.manual_seed(0)
    untrained = config.get_parsed_content("network_def", instantiate=True).eval()
    trained = copy.deepcopy(untrained)
    trained.load_state_dict(torch.load(args.checkpoint, weights_only=True)["network"])
    report = {"retrieval_trained": retrieval(trained, items),
              "retrieval_untrained": retrieval(untrained, items),
              "retrieval_reference": reference_retrieval(cases),
              "cosine_distance_untrained": number_distances(untrained),
              "cosine_distance_trained": number_distances(trained)}
    print(json.dumps(report, indent=2))
    if args.out:
        write_json(args.out, report)


if __name__ == "__main__":
    main()
