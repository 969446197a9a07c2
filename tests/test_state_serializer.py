"""Session state: JSON, or a pickle the replica made and signed; client data is never unpickled."""

from __future__ import annotations

import json
import pickle

import pytest

SECRET = b"0123456789abcdef0123456789abcdef"


def test_state_is_json_or_a_signed_pickle_and_client_data_is_never_unpickled(
    tmp_path,
) -> None:
    import base64

    from llama_deploy_ray._cluster.state_serializer import (
        SignedStateSerializer,
        StateIntegrityError,
    )

    serializer = SignedStateSerializer(SECRET)
    mark = tmp_path / "mark"

    class LeavesAMark:
        def __reduce__(self):
            return (open, (str(mark), "w"))

    attack = base64.b64encode(pickle.dumps(LeavesAMark())).decode()
    for value in ("plain", attack, {"__is_pydantic": True, "qualified_name": "os.system"}, [1]):
        assert serializer.deserialize(serializer.serialize(value)) == value
    assert not mark.exists()

    kept = serializer.serialize({1, 2, 3})  # not JSON: pickled by the replica, and signed
    assert serializer.deserialize(kept) == {1, 2, 3}
    forged = json.loads(kept)
    forged["pickle"] = base64.b64encode(pickle.dumps(LeavesAMark())).decode()
    with pytest.raises(StateIntegrityError, match="bad signature"):
        serializer.deserialize(json.dumps(forged))
    with pytest.raises(StateIntegrityError, match="bad signature"):
        SignedStateSerializer(b"another secret, 32 bytes long!!!").deserialize(kept)
    with pytest.raises(StateIntegrityError, match="not one of ours"):
        serializer.deserialize(json.dumps(attack))
    assert not mark.exists()


def test_a_known_class_wins_over_an_import_of_its_name() -> None:
    """A workflow pickled by value has its own copies of its event classes: a waiter restored
    from a snapshot must wait for those, not for what importing the name gives."""
    from workflows.events import Event, HumanResponseEvent

    from llama_deploy_ray._cluster.state_serializer import SignedStateSerializer

    class Copy(Event):
        response: str

    Copy.__module__, Copy.__name__ = "workflows.events", "HumanResponseEvent"
    known = SignedStateSerializer(SECRET, known_types=[Copy])
    assert known.resolve_class("workflows.events.HumanResponseEvent") is Copy
    assert (
        SignedStateSerializer(SECRET).resolve_class("workflows.events.HumanResponseEvent")
        is HumanResponseEvent
    )
