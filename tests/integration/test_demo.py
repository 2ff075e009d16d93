"""`histoxplain demo` on the real sample histology: the whole pipeline, as `make demo` runs it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from histoxplain_service.app.cli import main
from histoxplain_service.app.demo.local import DEMO_K, DEMO_RUNS

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def referenced_images(section: str) -> set[str]:
    return set(re.findall(r'src="([^"]+\.png)"', section))


def test_demo_writes_a_report_with_every_method(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    assert main(["demo", "--out", str(out), "--data-dir", str(tmp_path / "data")]) == 0
    page = (out / "index.html").read_text()
    for title in ("Grad-CAM", "Grad-CAM++", "SmoothGrad", "RISE", "dissimilarity"):
        assert title in page
    assert page.count("<h2>") == len(DEMO_RUNS)
    scores = [float(s) for s in re.findall(r'<span class="score">(-?[0-9.]+)</span>', page)]
    assert len(scores) == len(DEMO_RUNS) * DEMO_K
    assert all(-1.0 <= s <= 1.0 for s in scores)
    # the H&E query retrieves H&E tiles first, the IHC query IHC tiles
    sections = page.split("<h2>")[1:]
    assert "HE_skin" in sections[0].split("<tr>")[2]
    assert "IHC_colon" in sections[-1].split("<tr>")[2]
    # the similarity map's run shows its matched regions as numbered outlines on both images
    simmap = next(section for section in sections if section.startswith("Similarity map"))
    assert "Matched regions" in simmap and simmap.count('data-rank="1"') == 2 * DEMO_K
    assert all(name in referenced_images(simmap) for name in re.findall(r'<image href="([^"]+)"', simmap))
    referenced = set(re.findall(r'src="([^"]+\.png)"', page))
    assert referenced and all((out / name).is_file() for name in referenced)
    # run again: the index is reused (nothing doubled) and the report replaced whole
    assert main(["demo", "--out", str(out), "--data-dir", str(tmp_path / "data")]) == 0
    assert "tiles of 2 images" in (out / "index.html").read_text()
