"""`histoxplain evaluate retrieval|explanations` end to end on copies of every dataset layout
built from the real sample histology, with the real efficientnet-lite0 weights."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from histoxplain_model.errors import InvalidRequest
from histoxplain_service.evaluation.command import add_evaluate_parser
from histoxplain_service.evaluation.sample_layouts import CRC_PATTERN, sample_tiles, write_layout

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
pytestmark = pytest.mark.integration


def evaluate(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="histoxplain")
    add_evaluate_parser(parser.add_subparsers())
    args = parser.parse_args(["evaluate", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("layouts")
    tiles = sample_tiles(base / "samples", tile_size=128, per_class=8)
    return {layout: write_layout(layout, base / layout, tiles) for layout in ("bach", "bracs", "crc", "kather", "folders")}


@pytest.mark.parametrize("layout", ["bach", "bracs", "crc", "kather", "folders"])
def test_retrieval_on_each_layout(layouts: dict[str, Path], tmp_path: Path, layout: str) -> None:
    out = tmp_path / "out"
    common = [str(layouts[layout]), "--layout", layout, "--out", str(out), "--tile-size", "96", "--k", "1,5", "--crc-pattern", CRC_PATTERN]
    assert evaluate("retrieval", *common) == 0
    result = json.loads((out / "retrieval.json").read_text())
    tile_level, image_level = result["results"]["tile_level"], result["results"]["image_level"]
    assert result["results"]["dataset"]["images"] == 16
    assert result["encoder"]["preset"] == "efficientnet-lite0-imagenet"
    assert result["environment"]["command"].startswith("histoxplain")
    for level in (tile_level, image_level):
        for key in ("precision@1", "map@5", "accuracy@5"):
            assert 0.0 <= level["overall"][key] <= 1.0
        assert set(level["per_class"]) == set(result["results"]["dataset"]["labels"])
    # H&E versus IHC is an easy split for an ImageNet encoder: far above the 50 % chance level.
    assert image_level["overall"]["accuracy@1"] >= 0.75
    html = (out / "report.html").read_text()
    assert "precision@k" in html and "tile level" in html and "image level" in html
    # Resume: the second run reuses every cached embedding and gives the same numbers.
    cached = sorted((out / "cache").rglob("*.npz"))
    assert len(cached) == 16
    assert evaluate("retrieval", *common) == 0
    assert json.loads((out / "retrieval.json").read_text())["results"]["tile_level"] == tile_level


def test_explanations_end_to_end(layouts: dict[str, Path], tmp_path: Path) -> None:
    from histoxplain_model.saliency import METHODS

    out = tmp_path / "out"
    argv = [
        str(layouts["bracs"]), "--layout", "bracs", "--out", str(out), "--tile-size", "96",
        "--pairs", "3", "--steps", "4", "--road-steps", "2", "--smoothgrad-samples", "4", "--seed", "3",
        "--resamples", "200", "--option", "rise.n_masks=16",
    ]
    assert evaluate("explanations", *argv) == 0
    result = json.loads((out / "explanations.json").read_text())["results"]
    summary, settings = result["summary"], result["settings"]
    assert len(result["pairs"]) == 3
    variants = {v["name"] for v in settings["variants"]}
    # Every registered method, the CAMs on the finer stage too, the projection target where it differs.
    assert set(METHODS) <= variants and {"gradcam@previous", "gradcampp@previous", "gradcam+projection"} <= variants
    assert "simmap@previous" in settings["skipped_variants"] and "simmap+projection" in settings["skipped_variants"]
    assert settings["random_grids"] == {"random": [7, 7], "random@previous": [14, 14]}
    expected_scorer = "onnxruntime" if importlib.util.find_spec("onnxruntime") else "torch"
    assert settings["curve_scorer"] == expected_scorer
    rows = {(r["side"], r["polarity"], r["perturbation"], r["map"]) for r in summary["faithfulness"]}
    comparisons = {(c["side"], c["polarity"], c["perturbation"], c["curve"], c["map"]): c for c in summary["comparisons"]}
    for name in variants:
        for side in ("query", "retrieved"):
            for polarity in ("similar", "dissimilar"):
                for perturbation in ("blur", "road"):
                    assert (side, polarity, perturbation, name) in rows
                    for curve in ("deletion", "insertion"):
                        compared = comparisons[(side, polarity, perturbation, curve, name)]
                        assert compared["against"] == ("random@previous" if name.endswith("@previous") else "random")
                        assert compared["verdict"] in ("better than random", "no different", "worse than random")
                        assert compared["ci95"][0] <= compared["mean_difference"] <= compared["ci95"][1]
                        assert compared["pairs"] == 3 and 1 <= compared["clusters"] <= 3 and 0.0 <= compared["flat_maps"] <= 1.0
    for row in summary["faithfulness"]:
        assert len(row["mean_deletion_curve"]) == (5 if row["perturbation"] == "blur" else 3)
        assert -1.0 <= row["deletion_auc_mean"] <= 1.0
    for pair in result["pairs"]:
        curves = pair["curves"]["query"]
        # The first point is the unmodified pair's similarity (torch), whatever scored the curves.
        for perturbation in ("blur", "road"):
            assert curves["similar"][perturbation]["gradcam"]["deletion"][0] == pytest.approx(pair["score"], abs=1e-3)
        # Maps shared by both polarities are scored once: the dissimilar curve is the similar one negated.
        for shared in ("random", "random@previous", "gaussian", "random_pixel"):
            similar, dissimilar = curves["similar"]["blur"][shared], curves["dissimilar"]["blur"][shared]
            assert dissimilar["deletion"] == [-v for v in similar["deletion"]]
        # Every method has a dissimilar map of its own (SmoothGrad's signed form included).
        for method in ("smoothgrad", "simmap"):
            similar, dissimilar = curves["similar"]["blur"][method], curves["dissimilar"]["blur"][method]
            assert dissimilar["deletion"] != [-v for v in similar["deletion"]], method
        assert curves["similar"]["blur"]["random"] != curves["similar"]["blur"]["random@previous"]
        assert "gaussian" not in curves["similar"]["road"]  # ROAD only for what the comparisons need
        assert all(len(rhos) == 2 for rhos in pair["sanity_spearman"].values())
        assert pair["query"]["group"] and isinstance(pair["flat_maps"], list)
    assert set(summary["sanity"]) == set(METHODS)  # the served variants only
    # Default cascade: 2 steps, the second adds the block below the first.
    assert [names[0] for names in settings["randomised_cascade"]] == ["blocks.6", "blocks.5"]
    assert set(settings["randomised_cascade"][0]) < set(settings["randomised_cascade"][1])
    assert all(summary["runtime_median_s"][name]["query"] > 0 for name in variants)
    assert result["cost"]["pairs_computed"] == 3 and result["cost"]["seconds_per_pair_median"] > 0
    html = (out / "report.html").read_text()
    assert "ROAD MoRF" in html and "resampling query groups" in html and "verdict" in html and "step 2 Spearman" in html
    assert html.count("data:image/png;base64") >= 4 + 8 + 10  # forest plots + curves + best/worst grids
    # Resume with more pairs: the first three are reused (a prefix of the same permutation).
    more = list(argv)
    more[more.index("--pairs") + 1] = "4"
    assert evaluate("explanations", *more) == 0
    resumed = json.loads((out / "explanations.json").read_text())["results"]
    assert resumed["pairs"][:3] == result["pairs"] and resumed["cost"]["pairs_computed"] == 1
    assert len((out / "explanations.pairs.jsonl").read_text().splitlines()) == 4


def test_bad_input_is_invalid_request(layouts: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="expected ROOT/"):
        evaluate("retrieval", str(layouts["folders"]), "--layout", "kather", "--out", str(tmp_path))
    with pytest.raises(InvalidRequest, match="--k must be positive"):
        evaluate("retrieval", str(layouts["folders"]), "--layout", "folders", "--out", str(tmp_path), "--k", "0")
    with pytest.raises(InvalidRequest, match="unknown method"):
        evaluate("explanations", str(layouts["folders"]), "--layout", "folders", "--out", str(tmp_path), "--methods", "lime")
    with pytest.raises(InvalidRequest, match="must include random"):
        evaluate("explanations", str(layouts["folders"]), "--layout", "folders", "--out", str(tmp_path), "--reference-maps", "gaussian")
    with pytest.raises(InvalidRequest, match="unknown reference map 'noise'"):
        evaluate("explanations", str(layouts["folders"]), "--layout", "folders", "--out", str(tmp_path), "--reference-maps", "random,noise")
    with pytest.raises(InvalidRequest, match="--forward-batch must be >= 1"):
        evaluate("explanations", str(layouts["folders"]), "--layout", "folders", "--out", str(tmp_path), "--forward-batch", "0")
    with pytest.raises(InvalidRequest, match="unknown perturbation 'noise'"):
        evaluate("explanations", str(layouts["folders"]), "--layout", "folders", "--out", str(tmp_path), "--perturbations", "blur,noise")
    with pytest.raises(InvalidRequest, match="--option rise.masks: expected METHOD.FIELD=VALUE"):
        evaluate("explanations", str(layouts["folders"]), "--layout", "folders", "--out", str(tmp_path), "--option", "rise.masks=3")
