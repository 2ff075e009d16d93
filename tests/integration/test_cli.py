"""The ``histoxplain`` command end to end on real tiles: index, search, explain, info, delete, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histoxplain_service.app.cli import main
from histoxplain_service.app.samples import write_sample_dataset
from histoxplain_service.index.edge import EdgeEngine

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("samples")
    write_sample_dataset(root, tile_size=224, per_class=4)
    return root


@pytest.fixture(scope="module")
def indexed(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("data")
    assert main(["index", str(dataset), "--index", "tiles", "--data-dir", str(data_dir), "--no-progress"]) == 0
    return data_dir


def _query(dataset: Path) -> Path:
    return sorted((dataset / "HE_skin").glob("*.png"))[0]


def test_index_is_idempotent(dataset: Path, indexed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["index", str(dataset), "--index", "tiles", "--data-dir", str(indexed), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "0 image(s) indexed" in out and "8 already indexed" in out
    assert main(["info", "--index", "tiles", "--data-dir", str(indexed)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info[0]["n_images"] == 8 and info[0]["n_points"] == 8
    assert info[0]["preset"] == "efficientnet-lite0-imagenet" and info[0]["dim"] == 1280


def test_search_json_finds_the_same_tile_first(dataset: Path, indexed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    query = _query(dataset)
    assert main(["search", str(query), "--index", "tiles", "-k", "3", "--json", "--data-dir", str(indexed)]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3
    assert set(hits[0]) >= {"score", "image_id", "label", "source", "box"}
    assert hits[0]["source"] == str(query) and hits[0]["score"] > 0.999
    assert hits[0]["label"] == "HE_skin"
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_search_filter_keeps_only_matching_tiles(dataset: Path, indexed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The H&E query's nearest tiles are H&E; filtered to the other label, only IHC tiles come back.
    args = ["search", str(_query(dataset)), "--index", "tiles", "-k", "8", "--json", "--data-dir", str(indexed)]
    assert main([*args, "--filter", "label=IHC_colon"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 4 and {h["label"] for h in hits} == {"IHC_colon"}
    assert main([*args, "--filter", "label=IHC_colon", "--filter", "label=HE_skin"]) == 0  # either value
    assert len(json.loads(capsys.readouterr().out)) == 8
    assert main([*args, "--filter", "label"]) == 2  # not KEY=VALUE: a usage error


def test_search_images_ranks_whole_images(dataset: Path, indexed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", str(_query(dataset)), "--index", "tiles", "-k", "2", "--images", "--json",
                 "--data-dir", str(indexed)]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 2 and len({h["image_id"] for h in hits}) == 2


def test_explain_writes_overlays_and_report(dataset: Path, indexed: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main(["explain", str(_query(dataset)), "--index", "tiles", "-k", "2", "--method", "gradcam",
                 "--out", str(out), "--data-dir", str(indexed)]) == 0
    page = (out / "index.html").read_text()
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 1 + 2 * 3  # query, and per hit: tile, query map, hit map
    assert page.count("<tr>") == 3 and "Grad-CAM" in page
    for png in pngs:
        assert Image.open(png).size == (224, 224)
    assert not list(tmp_path.glob(".report-*")), "staging folder left behind"


def test_explain_with_the_similarity_map(dataset: Path, indexed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "simmap"
    assert main(["explain", str(_query(dataset)), "--index", "tiles", "-k", "2", "--method", "simmap",
                 "--polarity", "dissimilar", "--out", str(out), "--data-dir", str(indexed)]) == 0
    page = (out / "index.html").read_text()
    assert len(sorted(out.glob("*.png"))) == 1 + 2 * 3
    assert "Similarity map" in page and "dissimilar" in page
    assert main(["explain", str(_query(dataset)), "--index", "tiles", "-k", "1", "--method", "simmap",
                 "--samples", "3", "--out", str(tmp_path / "o"), "--data-dir", str(indexed)]) == 2
    assert "--method smoothgrad only" in _error(capsys)


def test_explain_prints_and_draws_matched_regions(
    dataset: Path, indexed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    query = _query(dataset)
    width, height = Image.open(query).size
    capsys.readouterr()
    argv = ["explain", str(query), "--index", "tiles", "-k", "2", "--method", "gradcam", "--target", "projection",
            "--correspondences", "3", "--data-dir", str(indexed)]
    assert main([*argv, "--json", "--out", str(tmp_path / "json")]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(printed[: printed.rindex("]") + 1])
    assert [row["rank"] for row in rows] == [1, 2]
    for row in rows:
        assert [pair["rank"] for pair in row["correspondences"]] == [1, 2, 3]
        for pair in row["correspondences"]:
            x, y, w, h = pair["query_box"]
            assert 0 <= x and 0 <= y and x + w <= width and y + h <= height
    page = (tmp_path / "json" / "index.html").read_text()
    assert "<th>Matched regions</th>" in page and page.count('data-rank="3"') == 4
    assert main([*argv, "--out", str(tmp_path / "text")]) == 0
    assert "hit 1: cosine" in capsys.readouterr().out
    assert main([*argv[:-4], "--correspondences", "17", "--out", str(tmp_path / "bad"), "--data-dir", str(indexed)]) == 2
    assert "correspondences must be an integer from 0 to 16" in _error(capsys)


def test_explain_smoothgrad_samples_and_noise_reach_the_model(
    dataset: Path, indexed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from histoxplain_model.options import SmoothGradOptions
    from histoxplain_service.backends.embedded import EmbeddedBackend

    seen: list[object] = []
    real_explain = EmbeddedBackend.explain

    def recording_explain(self, request, timeout=None):  # noqa: ANN001, ANN202
        seen.append(request.options)
        return real_explain(self, request, timeout)

    monkeypatch.setattr(EmbeddedBackend, "explain", recording_explain)
    out = tmp_path / "report"
    assert main(["explain", str(_query(dataset)), "--index", "tiles", "-k", "1", "--method", "smoothgrad",
                 "--samples", "2", "--noise", "0.3", "--side", "query", "--out", str(out),
                 "--data-dir", str(indexed)]) == 0
    assert seen == [SmoothGradOptions(n_samples=2, sigma=0.3)]
    assert len(sorted(out.glob("*.png"))) == 1 + 2  # query, and the hit's tile and query map


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--method", "gradcam", "--samples", "3"], "--method smoothgrad only"),
        (["--method", "smoothgrad", "--samples", "0"], "--samples: n_samples (SmoothGrad noisy copies) must be an integer from 1 to 256"),
        (["--method", "smoothgrad", "--samples", "100000"], "from 1 to 256, got 100000"),
        (["--method", "smoothgrad", "--noise", "1.5"], "--noise: sigma (SmoothGrad noise) must be a fraction"),
    ],
)
def test_explain_options_out_of_range_exit_2(
    dataset: Path, indexed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], needle: str
) -> None:
    out = tmp_path / "o"
    assert main(["explain", str(_query(dataset)), "--index", "tiles", "-k", "1", *flags, "--out", str(out),
                 "--data-dir", str(indexed)]) == 2
    assert needle in _error(capsys)
    assert not out.exists()


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error printed"
    assert err[-1].startswith("histoxplain: error: ")
    return err[-1]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "empty"),
        (b"not an image at all", "PNG, JPEG or TIFF"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, ""),
    ],
    ids=["empty", "unsupported", "truncated"],
)
def test_bad_query_image(indexed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, needle: str) -> None:
    query = tmp_path / "query.png"
    query.write_bytes(content)
    out = tmp_path / "out"
    code = main(["explain", str(query), "--index", "tiles", "-k", "2", "--method", "gradcam", "--out", str(out),
                 "--data-dir", str(indexed)])
    assert code == 2
    assert needle in _error(capsys)
    assert not out.exists()


def test_pixel_limit(indexed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    query = tmp_path / "big.png"
    Image.fromarray(np.zeros((300, 400, 3), np.uint8)).save(query)
    monkeypatch.setenv("HISTOXPLAIN_MAX_PIXELS", "1000")
    assert main(["search", str(query), "--index", "tiles", "-k", "1", "--data-dir", str(indexed)]) == 2
    assert "HISTOXPLAIN_MAX_PIXELS" in _error(capsys)


def test_missing_index_and_bad_k(dataset: Path, indexed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    query = str(_query(dataset))
    assert main(["search", query, "--index", "nope", "-k", "1", "--data-dir", str(indexed)]) == 3
    assert "histoxplain index" in _error(capsys)
    assert main(["search", query, "--index", "tiles", "-k", "0", "--data-dir", str(indexed)]) == 2
    assert "k must be" in _error(capsys)


def test_unknown_method_and_preset(dataset: Path, indexed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    query = str(_query(dataset))
    assert main(["explain", query, "--index", "tiles", "-k", "1", "--method", "lime", "--out", str(tmp_path / "o"),
                 "--data-dir", str(indexed)]) == 2
    assert "gradcam" in _error(capsys)
    assert main(["search", query, "--index", "tiles", "-k", "1", "--model", "nonexistent", "--data-dir", str(indexed)]) == 2
    assert "efficientnet-lite0-imagenet" in _error(capsys)


def test_other_encoder_is_refused(dataset: Path, indexed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import timm
    import torch

    weights = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict(), weights)
    code = main(["index", str(dataset / "HE_skin"), "--index", "tiles", "--model", "timm:resnet18",
                 "--weights", str(weights), "--data-dir", str(indexed), "--no-progress"])
    assert code == 4
    assert "efficientnet-lite0-imagenet" in _error(capsys)


def test_delete_removes_an_image(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = tmp_path / "data"
    files = sorted((dataset / "IHC_colon").glob("*.png"))[:2]
    assert main(["index", *map(str, files), "--index", "del", "--data-dir", str(data_dir), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["search", str(files[0]), "--index", "del", "-k", "1", "--json", "--data-dir", str(data_dir)]) == 0
    image_id = json.loads(capsys.readouterr().out)[0]["image_id"]
    assert main(["delete", image_id, "--index", "del", "--data-dir", str(data_dir)]) == 0
    assert main(["info", "--index", "del", "--data-dir", str(data_dir)]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info[0]["n_images"] == 1


def test_metadata_is_stored_searchable_and_shown(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = str(tmp_path / "data")
    skin, colon = sorted((dataset / "HE_skin").glob("*.png"))[:2], sorted((dataset / "IHC_colon").glob("*.png"))[:2]
    for files, organ in ((skin, "skin"), (colon, "colon")):
        assert main(["index", *map(str, files), "--index", "m", "--data-dir", data_dir, "--no-progress",
                     "--metadata", f"organ={organ}", "--metadata", "stain=mixed"]) == 0
    capsys.readouterr()
    args = ["search", str(skin[0]), "--index", "m", "-k", "4", "--json", "--data-dir", data_dir]
    assert main([*args, "--filter", "organ=colon"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 2 and all(h["metadata"] == {"organ": "colon", "stain": "mixed"} for h in hits)
    assert main(["index", str(skin[0]), "--index", "m", "--data-dir", data_dir, "--metadata", "label=x"]) == 2
    assert "not one of" in capsys.readouterr().err
    assert main(["index", str(skin[0]), "--index", "m", "--data-dir", data_dir, "--metadata", "organ"]) == 2


def test_every_command_closes_the_engine_it_opens(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The edge engine holds its folder's lock and unflushed shards until closed: each command,
    # failing ones too, must close what it opened (a real engine, its close() counted on the way).
    closed: list[int] = []
    real_close = EdgeEngine.close

    def counted_close(engine: EdgeEngine) -> None:
        closed.append(1)
        real_close(engine)

    monkeypatch.setattr(EdgeEngine, "close", counted_close)
    data_dir = str(tmp_path / "data")
    image = str(sorted((dataset / "HE_skin").glob("*.png"))[0])
    commands = [
        (["index", image, "--index", "c", "--no-progress"], 0),
        (["search", image, "--index", "c", "-k", "1"], 0),
        (["explain", image, "--index", "c", "-k", "1", "--method", "gradcam", "--out", str(tmp_path / "report")], 0),
        (["info"], 0),
        (["delete", "no-such-image", "--index", "c"], 0),
        (["search", image, "--index", "missing", "-k", "1"], 3),
    ]
    for number, (argv, code) in enumerate(commands, start=1):
        assert main([*argv, "--data-dir", data_dir]) == code, argv
        assert len(closed) == number, f"{argv[0]} left its engine open"
    capsys.readouterr()


def test_console_script_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("histoxplain")
    result = subprocess.run([str(exe), "search", str(tmp_path / "missing.png"), "--index", "x", "-k", "1",
                             "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "histoxplain: error:" in result.stderr


def test_explain_with_rise(dataset: Path, indexed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rise"
    assert main(["explain", str(_query(dataset)), "--index", "tiles", "-k", "2", "--method", "rise", "--side", "query",
                 "--rise-masks", "16", "--rise-grid", "5", "--rise-fill", "mean", "--out", str(out),
                 "--data-dir", str(indexed)]) == 0
    page = (out / "index.html").read_text()
    assert "RISE" in page and len(sorted(out.glob("*.png"))) == 1 + 2 * 2  # query; per hit: tile, query map
    assert main(["explain", str(_query(dataset)), "--index", "tiles", "-k", "1", "--method", "rise",
                 "--rise-masks", "0", "--out", str(tmp_path / "o"), "--data-dir", str(indexed)]) == 2
    assert "--rise-masks: n_masks (RISE masks) must be an integer from 1 to 2000" in _error(capsys)
    assert main(["explain", str(_query(dataset)), "--index", "tiles", "-k", "1", "--method", "gradcam",
                 "--rise-grid", "4", "--out", str(tmp_path / "o"), "--data-dir", str(indexed)]) == 2
    assert "--rise-grid apply to --method rise only" in _error(capsys)
