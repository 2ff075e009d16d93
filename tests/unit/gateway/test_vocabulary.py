"""One source for every shared name, code and limit: each copy is compared with its source.

The names live in ``histoxplain_model.vocabulary``; the SDK keeps its own table
(``histoxplain_client.enums``, it installs without the library) and the proto enums are a third
spelling. Error codes live on the error classes (``histoxplain_model.errors``); limits in
``histoxplain_model.limits``. A drift in any copy fails here.
"""

from __future__ import annotations

import argparse

import grpc
import pytest

from histoxplain_client import enums
from histoxplain_client._proto.histoxplain.v1 import types_pb2
from histoxplain_model import errors, limits, vocabulary
from histoxplain_model.saliency import METHODS
from histoxplain_model.wire.envelope import decode_envelope, encode_error
from histoxplain_service.app.cli import build_parser
from histoxplain_service.config import GatewaySettings, Settings
from histoxplain_service.gateway.interceptors import status_for


def _proto_names(enum_type: object) -> set[int]:
    return {value for name, value in enum_type.items() if not name.endswith("_UNSPECIFIED")}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("names", "sdk_table", "enum_type"),
    [
        (vocabulary.METHOD_NAMES, enums.METHODS, types_pb2.ExplanationMethod),
        (vocabulary.POLARITIES, enums.POLARITIES, types_pb2.Polarity),
        (vocabulary.SIDES, enums.SIDES, types_pb2.ExplanationSide),
        (vocabulary.RANKINGS, enums.RANKINGS, types_pb2.RankingLevel),
        (vocabulary.TARGETS, enums.TARGETS, types_pb2.ExplanationTarget),
    ],
    ids=["method", "polarity", "side", "ranking", "target"],
)
def test_sdk_tables_and_proto_enums_match_the_vocabulary(names, sdk_table, enum_type) -> None:
    assert tuple(sdk_table) == names
    assert set(sdk_table.values()) == _proto_names(enum_type)


def test_saliency_registry_is_the_vocabulary() -> None:
    assert tuple(METHODS) == vocabulary.METHOD_NAMES
    assert set(vocabulary.METHOD_TITLES) == set(vocabulary.METHOD_NAMES)


def _explain_options() -> dict[str, argparse.Action]:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {option: action for action in commands.choices["explain"]._actions for option in action.option_strings}


def test_cli_choices_are_the_vocabulary() -> None:
    options = _explain_options()
    assert tuple(options["--polarity"].choices) == vocabulary.POLARITIES
    assert options["--polarity"].default == vocabulary.DEFAULT_POLARITY
    assert tuple(options["--side"].choices) == vocabulary.SIDES
    assert options["--side"].default == vocabulary.DEFAULT_SIDE
    assert all(name in options["--method"].help for name in vocabulary.METHOD_NAMES)
    assert Settings().model == vocabulary.DEFAULT_PRESET


ERROR_CLASSES = [
    errors.InvalidRequest, errors.UnknownNameError, errors.ImageDecodeError, errors.ImageTooLargeError,
    errors.WeightsMismatchError, errors.NotFound, errors.FailedPrecondition, errors.DependencyUnavailable,
    errors.DeadlineExceeded, errors.ResourceExhausted, errors.PermissionDenied, errors.Cancelled,
]


@pytest.mark.parametrize("error_class", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_error_maps_the_same_way_in_the_gateway_the_cli_and_the_envelope(error_class) -> None:
    error = error_class("what to do")
    code, message = status_for(error)
    assert code is grpc.StatusCode[error.status_code] and message == "what to do"
    assert error.exit_code in (2, 3, 4, 5, 6, 7, 8, 130)
    with pytest.raises(error_class) as raised:
        decode_envelope(encode_error(error))
    assert raised.value.status_code == error.status_code and str(raised.value) == "what to do"


def test_status_and_exit_codes_are_one_to_one() -> None:
    bases = [errors.InvalidRequest, errors.NotFound, errors.FailedPrecondition, errors.DependencyUnavailable,
             errors.DeadlineExceeded, errors.ResourceExhausted, errors.PermissionDenied, errors.Cancelled]
    assert len({c.status_code for c in bases}) == len({c.exit_code for c in bases}) == len(bases)
    for base in bases:
        assert errors.error_class_for_status(base.status_code) is base
    assert status_for(RuntimeError("secret detail"))[0] is grpc.StatusCode.INTERNAL


@pytest.mark.parametrize("variable", ["HISTOXPLAIN_MAX_K", "HISTOXPLAIN_MAX_EXPLAIN_K"])
def test_settings_cannot_raise_k_past_the_limit_every_layer_checks(variable: str) -> None:
    with pytest.raises(errors.InvalidRequest, match=variable):
        GatewaySettings.from_env({variable: str(limits.MAX_K + 1)}, core=Settings())
    assert GatewaySettings.from_env({variable: str(limits.MAX_K)}, core=Settings())
