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
    out = tmp_path / "out"
    argv = [
        str(layouts["bracs"]), "--layout", "bracs", "--out", str(out), "--tile-size", "96",
        "--pairs", "2", "--steps", "4", "--smoothgrad-samples", "4", "--seed", "3",
    ]
    assert evaluate("explanations", *argv) == 0
    result = json.loads((out / "explanations.json").read_text())["results"]
    summary = result["summary"]
    assert len(result["pairs"]) == 2
    rows = {(r["side"], r["polarity"], r["map"]) for r in summary["faithfulness"]}
    for method in ("gradcam", "gradcampp", "smoothgrad", "simmap", "random", "gaussian", "random_pixel"):
        for side in ("query", "retrieved"):
            for polarity in ("similar", "dissimilar"):
                assert (side, polarity, method) in rows
    for row in summary["faithfulness"]:
        assert len(row["mean_deletion_curve"]) == 5
        assert -1.0 <= row["deletion_auc_mean"] <= 1.0
    settings = result["settings"]
    expected_scorer = "onnxruntime" if importlib.util.find_spec("onnxruntime") else "torch"
    assert settings["curve_scorer"] == expected_scorer
    for pair in result["pairs"]:
        curves = pair["curves"]["query"]
        # The first deletion point is the unmodified pair's similarity (torch), whatever scored the curves.
        assert curves["similar"]["blur"]["gradcam"]["deletion"][0] == pytest.approx(pair["score"], abs=1e-3)
        # Maps shared by both polarities are scored once: the dissimilar curve is the similar one negated.
        for shared in ("random", "gaussian", "random_pixel"):
            similar, dissimilar = curves["similar"]["blur"][shared], curves["dissimilar"]["blur"][shared]
            assert dissimilar["deletion"] == [-v for v in similar["deletion"]]
        # Every method has a dissimilar map of its own (SmoothGrad's signed form included).
        for method in ("smoothgrad", "simmap"):
            similar, dissimilar = curves["similar"]["blur"][method], curves["dissimilar"]["blur"][method]
            assert dissimilar["deletion"] != [-v for v in similar["deletion"]], method
        assert curves["similar"]["blur"]["random"] != curves["similar"]["blur"]["random_pixel"]
        assert all(len(rhos) == 2 for rhos in pair["sanity_spearman"].values())
    assert set(summary["sanity"]) == {"gradcam", "gradcampp", "smoothgrad", "simmap"}
    # Default cascade: 2 steps, the second adds the block below the first.
    assert settings["randomised_modules"][0] == "blocks.6"
    assert [names[0] for names in settings["randomised_cascade"]] == ["blocks.6", "blocks.5"]
    assert set(settings["randomised_cascade"][0]) < set(settings["randomised_cascade"][1])
    for values in summary["sanity"].values():
        assert [step["step"] for step in values["steps"]] == [1, 2]
        assert values["passes"] == values["steps"][-1]["passes"]
    # The smooth random map lives on the target layer's grid: 7x7 for EfficientNet-Lite0 at its 224 px input.
    assert settings["random_grid"] == [7, 7]
    assert all(summary["runtime_median_s"][m]["query"] > 0 for m in summary["runtime_median_s"])
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64") >= 4 + 6  # curves + best/worst grids
    assert "step 2 Spearman" in html and "del. beats random_pixel" in html
    for row in summary["faithfulness"]:
        assert 0.0 <= row["deletion_beats_random_pixel"] <= 1.0
        if row["map"] == "random":
            assert row["deletion_beats_random"] == row["insertion_beats_random"] == 0.0
    journal = (out / "explanations.pairs.jsonl").read_text().splitlines()
    assert len(journal) == 2
    # Resume: nothing is recomputed, the journal does not grow.
    assert evaluate("explanations", *argv) == 0
    assert len((out / "explanations.pairs.jsonl").read_text().splitlines()) == 2


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
