"""License normalisation and the allow-list filter."""

import pytest

from data_prep import licenses


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("CC BY-SA 2.0", "cc-by-sa"),
        ("http://creativecommons.org/licenses/by-sa/2.0/", "cc-by-sa"),
        ("https://creativecommons.org/licenses/by/4.0/deed.en", "cc-by"),
        ("https://creativecommons.org/licenses/by-nc-nd/3.0/", "cc-by-nc-nd"),
        ("https://creativecommons.org/publicdomain/zero/1.0/", "cc0"),
        ("http://creativecommons.org/publicdomain/mark/1.0/", "pdm"),
        ("Public Domain Mark", "pdm"),
        ("public domain mark 1.0", "pdm"),
        ("CC0 1.0 Universal", "cc0"),
        ("CC0", "cc0"),
        ("cc-by-sa 3.0 unported", "cc-by-sa"),
        ("Attribution License", "cc-by"),
        ("Attribution-ShareAlike License", "cc-by-sa"),
        ("Attribution-NonCommercial-ShareAlike License", "cc-by-nc-sa"),
        ("Attribution-NoDerivs License", "cc-by-nd"),
        ("cc-by-sa-4.0", "cc-by-sa"),
        ("CC-BY-NC 4.0", "cc-by-nc"),
        (4, "cc-by"),
        ("5", "cc-by-sa"),
        (9, "cc0"),
        (10, "pdm"),
        (0, "all-rights-reserved"),
        ("All Rights Reserved", "all-rights-reserved"),
        ("No known copyright restrictions", "nkcr"),
        ("my own license", None),
        ("", None),
        (42, None),
        (None, None),
    ],
)
def test_normalise(raw, want):
    assert licenses.normalise(raw) == want


def test_decide_reasons():
    allowed = licenses.parse_allowed("cc0,pdm,cc-by,cc-by-sa")
    assert licenses.decide({"license": "CC BY 2.0"}, allowed).reject_reason is None
    assert licenses.decide({}, allowed).reject_reason == "license_missing"
    d = licenses.decide({"license": "WTFPL-ish"}, allowed)
    assert (d.reject_reason, d.raw) == ("license_unknown", "WTFPL-ish")
    d = licenses.decide({"licenseurl": "http://creativecommons.org/licenses/by-nc/2.0/"}, allowed)
    assert (d.reject_reason, d.license) == ("license_not_allowed", "cc-by-nc")
    assert licenses.decide({}, None) == licenses.Decision("unknown", None, None)


def test_find_url_and_parse_allowed_errors():
    assert licenses.find_url({"URL": "http://a/b.jpg"}) == "http://a/b.jpg"
    assert licenses.parse_allowed("any") is None
    with pytest.raises(ValueError, match=r"unknown ids \['cc-by-foo'\]"):
        licenses.parse_allowed("cc0,cc-by-foo")
