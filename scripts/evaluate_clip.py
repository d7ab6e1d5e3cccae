"""Held-out retrieval and number sensitivity of the CLIP-pretrained lung-function text encoder.

    python scripts/evaluate_clip.py --dataset data/prepared --checkpoint runs/demo/pretrain_clip/last.pt --image-size 32 32 32

- text-to-image retrieval on patients never seen in pre-training (the test split, or with
  ``--all-cases`` every case of another prepared cohort, e.g. a new seed): for each record's text,
  the rank of its own patient's image among all those images; top-1 and top-5 accuracy against
  chance (1/N and 5/N) and the median rank;
- number sensitivity: cosine distance between the text embeddings of records that differ only in
  FVC (2000 vs 3000 ml) or only in % predicted (50 vs 90), for the untrained encoder and the
  pre-trained one (a general text encoder barely separates them; pre-training must).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custom.clip import CLIPModel, TextEncoder  # noqa: E402
from custom.data import DatasetSplit  # noqa: E402
from custom.text import record_to_text  # noqa: E402

BASE = {"FVC": 2500, "Percent": 70, "Age": 70, "Sex": "Male", "SmokingStatus": "Ex-smoker", "DLCO": 55}


def load_images(cases: list[dict], size: list[int]) -> torch.Tensor:
    """The cases' initial scans, downsampled as in pre-training."""
    from monai.transforms import Compose, EnsureTyped, LoadImaged, Resized

    load = Compose([LoadImaged("image", ensure_channel_first=True, image_only=True),
                    Resized("image", spatial_size=size, mode="area"), EnsureTyped("image", dtype=torch.float32)])
    return torch.stack([load({"image": c["image"]})["image"] for c in cases])


def number_distances(model: CLIPModel) -> dict[str, float]:
    """Cosine distances of text embeddings for records differing in one number only."""
    pairs = {"FVC 2000 vs 3000 ml": ({**BASE, "FVC": 2000}, {**BASE, "FVC": 3000}),
             "Percent 50 vs 90": ({**BASE, "Percent": 50}, {**BASE, "Percent": 90})}
    out = {}
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            ea, eb = model.embed_text([record_to_text(a), record_to_text(b)])
            out[name] = float(1 - F.cosine_similarity(ea, eb, dim=0))
    return out


def retrieval(model: CLIPModel, cases: list[dict], size: list[int]) -> dict[str, float]:
    """Top-1 and top-5 text-to-image retrieval accuracy and their chance levels."""
    with torch.no_grad():
        images = model.embed_image(load_images(cases, size))
        texts = model.embed_text([record_to_text(c["record"]) for c in cases])
    order = (texts @ images.t()).argsort(dim=1, descending=True)
    n = len(cases)
    rank = (order == torch.arange(n)[:, None]).float().argmax(dim=1) + 1
    return {"cases": n, "top1": float((rank <= 1).float().mean()), "top1_chance": 1 / n,
            "top5": float((rank <= 5).float().mean()), "top5_chance": min(5 / n, 1.0),
            "median_rank": float(rank.float().median()), "median_rank_chance": (n + 1) / 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True, help="prepared dataset folder")
    parser.add_argument("--checkpoint", type=Path, required=True, help="pretrain_clip.json's last.pt")
    parser.add_argument("--all-cases", action="store_true",
                        help="use every case of the datalist (a cohort none of whose patients was in pre-training)")
    parser.add_argument("--image-size", type=int, nargs=3, default=[48, 48, 48],
                        help="image_size of the pre-training (configs/pretrain_clip.json; the demo uses 32)")
    parser.add_argument("--embed-dim", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    untrained = CLIPModel(TextEncoder(), embed_dim=args.embed_dim).eval()
    trained = CLIPModel(TextEncoder(), embed_dim=args.embed_dim).eval()
    trained.load_state_dict(torch.load(args.checkpoint, weights_only=True)["network"])
    split = DatasetSplit(args.dataset / "datalist.json", val_fold=None)
    cases = split.training() + split.testing() if args.all_cases else split.testing()
    report = {"retrieval_trained": retrieval(trained, cases, args.image_size),
              "retrieval_untrained": retrieval(untrained, cases, args.image_size),
              "cosine_distance_untrained": number_distances(untrained),
              "cosine_distance_trained": number_distances(trained)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
