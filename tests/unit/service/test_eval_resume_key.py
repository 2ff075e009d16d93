"""What a resumed explanation evaluation reuses: pairs computed with the same effective options
only. A library default that changes between two runs (RISE's number of masks, say) must start
new pairs, not mix with the old ones."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from histoxplain_model.options import RiseOptions
from histoxplain_service.evaluation import explanations
from histoxplain_service.evaluation.explanations import ExplanationConfig, _config_key
from histoxplain_service.evaluation.retrieval import EvaluationConfig


@pytest.fixture
def config(tmp_path: Path) -> EvaluationConfig:
    return EvaluationConfig(root=tmp_path, layout="folders", out=tmp_path / "out")


def test_the_key_ignores_the_number_of_pairs_and_resamples(config: EvaluationConfig) -> None:
    base = ExplanationConfig()
    assert _config_key(config, base) == _config_key(config, replace(base, pairs=200, resamples=100))


def test_a_changed_library_default_changes_the_key(config: EvaluationConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    base = ExplanationConfig()
    before = _config_key(config, base)
    defaults = explanations.default_options

    def with_more_masks(method: str):
        options = defaults(method)
        return replace(options, n_masks=options.n_masks * 2) if isinstance(options, RiseOptions) else options

    monkeypatch.setattr(explanations, "default_options", with_more_masks)
    assert _config_key(config, base) != before


def test_an_explicit_option_changes_the_key(config: EvaluationConfig) -> None:
    base = ExplanationConfig()
    more = replace(base, method_options=(f"rise.n_masks={RiseOptions().n_masks * 2}",))
    assert more.options()["rise"].n_masks == RiseOptions().n_masks * 2
    assert _config_key(config, more) != _config_key(config, base)
