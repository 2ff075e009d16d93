"""Settings.from_env: defaults, every variable parsed, bad values named with what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from histoxplain_model.errors import InvalidRequest
from histoxplain_model.imageio import DEFAULT_MAX_PIXELS
from histoxplain_model.vocabulary import DEFAULT_PRESET
from histoxplain_service.config import Settings


def test_defaults_from_an_empty_environment() -> None:
    settings = Settings.from_env({})
    assert settings.data_dir == Path("histoxplain-data")
    assert settings.qdrant_url is None and settings.qdrant_api_key is None
    assert settings.max_pixels == DEFAULT_MAX_PIXELS
    assert settings.model == DEFAULT_PRESET == "efficientnet-lite0-imagenet"
    assert settings.weights is None
    assert settings.tile_size == 224 and settings.stride is None and settings.tile_stride == 224
    assert settings.qdrant_path == Path("histoxplain-data/qdrant")
    assert settings.tiles_dir("crc") == Path("histoxplain-data/tiles/crc")


def test_every_variable_is_read(tmp_path: Path) -> None:
    environ = {
        "HISTOXPLAIN_DATA": str(tmp_path / "data"),
        "QDRANT_URL": "https://qdrant.example.org:6333/",
        "QDRANT_API_KEY": "s3cret",
        "HISTOXPLAIN_MAX_PIXELS": "1_000_000",
        "HISTOXPLAIN_MODEL": "uni",
        "HISTOXPLAIN_WEIGHTS": str(tmp_path / "uni.bin"),
        "HISTOXPLAIN_TILE_SIZE": "256",
        "HISTOXPLAIN_STRIDE": "128",
        "HISTOXPLAIN_MIN_TISSUE": "0.5",
        "HISTOXPLAIN_SLIDE_LEVEL": "1",
        "HISTOXPLAIN_BATCH_SIZE": "16",
    }
    settings = Settings.from_env(environ)
    assert settings.data_dir == tmp_path / "data"
    assert settings.qdrant_url == "https://qdrant.example.org:6333"
    assert settings.qdrant_api_key == "s3cret"
    assert "s3cret" not in repr(settings)
    assert settings.max_pixels == 1_000_000
    assert settings.model == "uni"
    assert settings.weights == tmp_path / "uni.bin"
    assert (settings.tile_size, settings.stride, settings.tile_stride) == (256, 128, 128)
    assert settings.min_tissue == 0.5
    assert settings.slide_level == 1
    assert settings.batch_size == 16


def test_empty_values_count_as_unset() -> None:
    settings = Settings.from_env({"HISTOXPLAIN_TILE_SIZE": "", "QDRANT_URL": " ", "HISTOXPLAIN_DATA": ""})
    assert settings == Settings()


@pytest.mark.parametrize(
    ("variable", "value", "allowed"),
    [
        ("HISTOXPLAIN_TILE_SIZE", "abc", "integer from 16 to 8192"),
        ("HISTOXPLAIN_TILE_SIZE", "8", "integer from 16 to 8192"),
        ("HISTOXPLAIN_STRIDE", "0", "integer from 1 to 8192"),
        ("HISTOXPLAIN_MAX_PIXELS", "-5", "integer >= 1"),
        ("HISTOXPLAIN_MAX_PIXELS", "1e9", "integer >= 1"),
        ("HISTOXPLAIN_MIN_TISSUE", "1.5", "number from 0 to 1"),
        ("HISTOXPLAIN_MIN_TISSUE", "nan", "number from 0 to 1"),
        ("HISTOXPLAIN_SLIDE_LEVEL", "-1", "integer >= 0"),
        ("HISTOXPLAIN_BATCH_SIZE", "0", "integer from 1 to 4096"),
        ("QDRANT_URL", "localhost:6333", "http:// or https://"),
    ],
)
def test_bad_values_name_the_variable_and_what_is_allowed(variable: str, value: str, allowed: str) -> None:
    with pytest.raises(InvalidRequest) as excinfo:
        Settings.from_env({variable: value})
    assert variable in str(excinfo.value)
    assert allowed in str(excinfo.value)


def test_with_changes_validates_again() -> None:
    settings = Settings()
    assert settings.with_changes(tile_size=512).tile_size == 512
    with pytest.raises(InvalidRequest, match="HISTOXPLAIN_BATCH_SIZE"):
        settings.with_changes(batch_size=0)


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.tile_size = 10  # type: ignore[misc]
