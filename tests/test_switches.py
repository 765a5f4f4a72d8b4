"""Environment switches read one way (turbopart.runtime.switches)."""
from turbopart.runtime.switches import switch


def test_default_on_and_off(monkeypatch):
    monkeypatch.delenv("TURBOPART_T", raising=False)
    assert switch("TURBOPART_T") is True and switch("TURBOPART_T", False) is False
    for value, on, off in (("0", False, False), ("1", True, True), (" 0 ", False, False),
                           ("", True, False), ("yes", True, False)):
        monkeypatch.setenv("TURBOPART_T", value)
        assert switch("TURBOPART_T") is on and switch("TURBOPART_T", False) is off
