"""protocol/errors.py: every error class carries its exit code, HTTP status and wire code, and every translation
(control API, jobs, ErrorMessage, third-party exceptions) is derived from the classes."""

from __future__ import annotations

import pytest

from kvswap.protocol import errors
from kvswap.protocol.errors import (
    Busy,
    FormatError,
    IntegrityError,
    KvswapError,
    LimitExceeded,
    LocalProtocolError,
    ModelMismatch,
    NotFound,
    OverBudget,
    PaymentRequired,
    RemoteProtocolError,
    UntrustedSigner,
    UsageError,
    error_classes,
    error_from_payload,
    error_from_wire,
    error_payload,
    map_exceptions,
    wire_code_of,
    wire_codes,
)
from kvswap.protocol.messages import ERROR_CODES, ErrorMessage

ALL = [getattr(errors, name) for name in errors.__all__
       if isinstance(getattr(errors, name), type) and issubclass(getattr(errors, name), KvswapError)]


def test_every_class_is_known_by_name():
    # in a fresh interpreter: a harness that defines its own subclass (bench's testnet) is not the product's tree
    import json
    import subprocess
    import sys

    names = subprocess.run([sys.executable, "-c", "import json, kvswap.cli, kvswap.node.daemon; "
                            "from kvswap.protocol.errors import error_classes; print(json.dumps(sorted(error_classes())))"],
                           capture_output=True, text=True, check=True).stdout
    assert set(json.loads(names)) == {cls.__name__ for cls in ALL}


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_control_api_payload_round_trips_to_the_same_class(cls):
    back = error_from_payload(error_payload(cls("something went wrong")))
    assert type(back) is cls and str(back) == "something went wrong"


def test_unknown_or_foreign_payload_types_become_a_plain_kvswap_error():
    for name in ("NoSuchError", "ValueError", "Exception", ""):
        back = error_from_payload({"type": name, "message": "x"})
        assert type(back) is KvswapError and str(back) == "x"


def test_http_status_and_exit_code_per_class():
    assert {cls.__name__: cls.http_status for cls in ALL} == {
        "KvswapError": 500, "FormatError": 400, "IntegrityError": 422, "UntrustedSigner": 422, "AuditFailed": 422,
        "ModelMismatch": 409, "NotFound": 404, "ProtocolError": 500, "LocalProtocolError": 500,
        "RemoteProtocolError": 502, "DataPlaneFailed": 502, "RelayOnly": 502, "LimitExceeded": 413, "Busy": 503,
        "PaymentRequired": 402, "OverBudget": 402, "UsageError": 400}
    assert {cls.__name__ for cls in ALL if cls.exit_code != 1} == {"UsageError"}
    assert UsageError.exit_code == 2


def test_every_wire_code_is_a_protocol_error_code():
    assert wire_codes() <= ERROR_CODES
    for cls in ALL:
        ErrorMessage(wire_code_of(cls("x")), "x")  # constructs: the code is valid on the wire


def test_wire_codes_map_back_only_to_the_class_that_declares_them():
    assert wire_code_of(NotFound("x")) == "not_found"
    assert wire_code_of(ModelMismatch("x")) == "model_mismatch"
    assert wire_code_of(LimitExceeded("x")) == "limit"
    assert wire_code_of(Busy("x")) == "busy"
    assert wire_code_of(PaymentRequired("x")) == wire_code_of(OverBudget("x")) == "payment"
    assert wire_code_of(UntrustedSigner("x")) == wire_code_of(FormatError("x")) == "bad_request"
    assert wire_code_of(ValueError("a bug")) == "internal"
    for code, cls in (("not_found", NotFound), ("model_mismatch", ModelMismatch), ("limit", LimitExceeded),
                      ("bad_request", RemoteProtocolError), ("busy", Busy), ("payment", PaymentRequired),
                      ("internal", RemoteProtocolError)):
        err = error_from_wire(code, "peer x: why")
        assert type(err) is cls and str(err) == "peer x: why"


def test_map_exceptions_translates_listed_types_and_lets_others_through():
    with pytest.raises(RemoteProtocolError, match="^dialing x: refused$") as info:
        with map_exceptions({(OSError, EOFError): RemoteProtocolError, ValueError: UsageError}, "dialing x"):
            raise ConnectionRefusedError("refused")
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    with pytest.raises(UsageError, match="^bad$"):
        with map_exceptions({OSError: RemoteProtocolError, ValueError: UsageError}):
            raise ValueError("bad")
    with pytest.raises(KeyError):  # not listed: a bug, passed through untouched
        with map_exceptions({OSError: RemoteProtocolError}):
            raise KeyError("k")
    with pytest.raises(LocalProtocolError):  # kvswap's own errors are not re-labelled
        with map_exceptions({OSError: RemoteProtocolError}):
            raise LocalProtocolError("ours")
    with map_exceptions({OSError: RemoteProtocolError}):
        pass


def test_first_matching_mapping_wins_and_empty_messages_name_the_type():
    with pytest.raises(IntegrityError, match="^EOFError$"):
        with map_exceptions({EOFError: IntegrityError, Exception: RemoteProtocolError}):
            raise EOFError()
