"""The photo tests' guard (builders._need_photos): a contributor without the Debian photographs gets
a skip naming the apt-get command; CI (.ci/run sets MFSR_REQUIRE_PHOTOS) gets a failure instead."""
import pytest

import miniature
from builders import REQUIRE_PHOTOS, _need_photos


def test_a_missing_photograph_skips_with_the_command_and_fails_under_ci(monkeypatch):
    pytest.importorskip("skimage")
    monkeypatch.setitem(miniature.PHOTOS, "gone", ("some-debian-pkg", "/nonexistent/gone.jpg", "x"))
    monkeypatch.delenv(REQUIRE_PHOTOS, raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install .*some-debian-pkg"):
        _need_photos(["gone"])
    monkeypatch.setenv(REQUIRE_PHOTOS, "1")
    with pytest.raises(pytest.fail.Exception, match=f"{REQUIRE_PHOTOS} is set"):
        _need_photos(["gone"])
    _need_photos(["chelsea"])                      # scikit-image's: present wherever skimage is
