import pytest

from compress.errors import CompressError
from compress.registry import Registry


def test_get_and_names():
    reg: Registry[int] = Registry("thing")
    reg.register("alpha")(1)
    reg.register("beta")(2)
    assert reg.get("beta") == 2
    assert reg.names() == ["alpha", "beta"]
    assert "alpha" in reg and "gamma" not in reg and len(reg) == 2


def test_unknown_name_suggests_close_match():
    reg: Registry[int] = Registry("thing")
    reg.register("resnet20")(1)
    with pytest.raises(CompressError, match=r"unknown thing 'resnet2O'; did you mean resnet20\?"):
        reg.get("resnet2O")


def test_duplicate_registration_is_refused():
    reg: Registry[int] = Registry("thing")
    reg.register("a")(1)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(2)
